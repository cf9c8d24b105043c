//! Tensor-parallel ranks: communicator, rendezvous, plan broadcast, launcher.
