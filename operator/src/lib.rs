//! dspark-operator: reconciles `DSparkDeployment` objects into tensor-parallel serving groups.
//!
//! `crd` (the resource and profile resolution) -> `resources` (pure desired-state builders) ->
//! `group` (group semantics) -> `status` (conditions) -> `controller` (the only code that talks
//! to the API server), plus `leader`, `metrics` and `telemetry` for the binary.

pub mod controller;
pub mod crd;
pub mod group;
pub mod leader;
pub mod metrics;
pub mod resources;
pub mod status;
pub mod telemetry;
