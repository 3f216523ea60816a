# Environment for lov-jax jobs on GPU nodes: the one place for XLA-on-GPU flags.
# Sourced by launch/slurm.sbatch (every SLURM job) and benchmarks/gpu.sh.
# Latency-hiding scheduler: overlap FSDP all-gathers / reduce-scatters with compute.
_LOV_JAX_GPU_XLA_FLAGS="--xla_gpu_enable_latency_hiding_scheduler=true"
case " ${XLA_FLAGS:-} " in
  *" --xla_gpu_enable_latency_hiding_scheduler"*) ;;  # the job set its own
  *) export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }$_LOV_JAX_GPU_XLA_FLAGS" ;;
esac
# Share of GPU memory JAX preallocates (default 0.75): more room for activations.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
# Quiet TensorFlow (tensorflow-datasets imports it) and never reach for the HF hub.
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
