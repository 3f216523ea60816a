# Environment for lov-jax jobs on TPU VMs / GKE TPU nodes: the one place for libtpu flags.
# Sourced on every worker before `lov-jax ...` (launch/tpu_vm.sh, launch/gke_xpk.sh).
# Overlap FSDP all-gathers / reduce-scatters with compute (async collective fusion).
export LIBTPU_INIT_ARGS="${LIBTPU_INIT_ARGS:---xla_tpu_enable_async_collective_fusion=true --xla_tpu_enable_async_collective_fusion_fuse_all_gather=true --xla_tpu_enable_async_collective_fusion_multiple_steps=true --xla_tpu_overlap_compute_collective_tc=true --xla_enable_async_all_gather=true}"
# Fewer libtpu log lines in the job logs; 0 = everything.
export TPU_STDERR_LOG_LEVEL="${TPU_STDERR_LOG_LEVEL:-2}"
export TPU_MIN_LOG_LEVEL="${TPU_MIN_LOG_LEVEL:-2}"
# Quiet TensorFlow (tensorflow-datasets imports it) and never reach for the HF hub.
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
