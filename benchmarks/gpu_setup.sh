# Sourced by the GPU scripts on the lent machine: the environment, the carried wheels (.whl/) installed into
# /tmp/site, kvpolicy installed in place, and the card's name.
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>&1 | tail -1
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . 2>&1 | tail -1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
