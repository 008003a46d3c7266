# Sourced at the start of every command on a GPU machine prepared by prepare_gpu_carry.sh:
#   source benchmarks/gpu_env.sh
# Installs the carried wheels into /tmp/site and puts polypseg's sources on the path.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
export POLYPSEG_CACHE=/tmp/polypseg-cache
polypseg() { python3 -m polypseg.cli.main "$@"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
