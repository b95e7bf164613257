# Sourced by the GPU measuring script (gpu.sh) after the wheels were staged:
#   source "$(dirname "$0")/gpu_common.sh" DEFAULT_OUT
# Moves to the repository root, puts the project and the staged environment's tools on the paths, makes the
# output folder ($OUT, else DEFAULT_OUT) as $out, and records the GPU there (nvidia-smi.txt).
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONPATH="$PWD:$PWD/client" PYTHONUNBUFFERED=1
export PATH="$(python3 -c 'import sys; print(sys.prefix)')/bin:$PATH"
out="${OUT:-$1}"
mkdir -p "$out"
# Publishing reads Unicode CLDR's English names (the text rules); the GPU machine has no Debian package for them, so
# a run carries the three files in .cldr/ (ignored by git), made here by:
#   for d in annotations annotationsDerived properties; do mkdir -p .cldr/$d; done
#   cp /usr/share/unicode/cldr/common/annotations/en.xml .cldr/annotations/
#   cp /usr/share/unicode/cldr/common/annotationsDerived/en.xml .cldr/annotationsDerived/
#   cp /usr/share/unicode/cldr/common/properties/labels.txt .cldr/properties/
if [ -d .cldr ] && [ ! -f /usr/share/unicode/cldr/common/annotations/en.xml ]; then
  mkdir -p /usr/share/unicode/cldr/common && cp -r .cldr/. /usr/share/unicode/cldr/common/
fi
nvidia-smi --query-gpu=name,memory.used,memory.total,driver_version --format=csv | tee "$out/nvidia-smi.txt"

# Triton's own info and warning lines (I1126 ..., W1126 ...) stay out of the measuring logs.
without_triton_log() { grep -v '^[IW][0-9]'; }
