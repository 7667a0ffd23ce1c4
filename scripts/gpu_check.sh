#!/usr/bin/env bash
# One command for the GPU check of issue #27 (docs/bench.md, "GPU check"): installs the wheels carried in
# wheels/cpXY/ (made by `make gpu-wheels`) into a folder of its own, then runs scripts/gpu_check.py, which writes
# gpu_check/gpu_check.{json,md}. Without a CUDA GPU (or with --dry-run) the same checks run on CPU in seconds.
#   scripts/gpu_check.sh [--dry-run] [--corpus FILE] [--out-dir DIR] [--total-budget 430s] [--quality-side 2m]
# PYTHON picks the interpreter (default: python3, the one holding torch on the GPU machines).
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=gpu_check
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[i]}" in
    --out-dir) OUT=${args[i + 1]:-gpu_check} ;;
    --out-dir=*) OUT=${args[i]#--out-dir=} ;;
  esac
done
# The folder is the check's own (marked .gpu_check), or new or empty: only then is what it holds replaced
if [ -d "$OUT" ] && [ -n "$(ls -A "$OUT")" ] && [ ! -f "$OUT/.gpu_check" ]; then
  echo "gpu_check: error: --out-dir $OUT holds files that gpu_check did not write; give a new or empty folder" >&2
  exit 2
fi
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) && touch "$OUT/.gpu_check" || exit 2
tag=$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")') || {
  echo "gpu_check: $PY does not run; set PYTHON to the interpreter that holds torch" >&2; exit 2; }
wheels=${GPU_CHECK_WHEELS:-wheels}/$tag  # GPU_CHECK_WHEELS: another folder of cpXY/ folders (tests)
site=$OUT/site
install_report=$OUT/install.json
rm -f "$install_report"
# Each wheel without its dependencies (the machine has no index; wheels/ holds exactly what it lacks) into
# $site, first on PYTHONPATH; the fused loss kernel into a folder of its own, which only the fused train row sees.
if compgen -G "$wheels/*.whl" >/dev/null; then
  start=$(date +%s.%N)
  rm -rf "$site" "$site-fused"
  main=() fused=()
  for w in "$wheels"/*.whl; do
    case "$(basename "$w")" in liger_kernel-*) fused+=("$w") ;; *) main+=("$w") ;; esac
  done
  pip=("$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --disable-pip-version-check)
  status=ok reason=
  if [ ${#main[@]} -gt 0 ] && ! "${pip[@]}" --target "$site" "${main[@]}" >"$OUT/install.log" 2>&1; then
    status=failed reason="pip install of $wheels failed: $(tail -n 1 "$OUT/install.log")"
  fi
  if [ ${#fused[@]} -gt 0 ] && ! "${pip[@]}" --target "$site-fused" "${fused[@]}" >>"$OUT/install.log" 2>&1; then
    status=failed reason="pip install of ${fused[*]} failed: $(tail -n 1 "$OUT/install.log")"
  fi
  [ ${#fused[@]} -gt 0 ] && export GPU_CHECK_FUSED_SITE=$site-fused
  export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
  "$PY" - "$status" "$reason" "$start" "${#main[@]}" "${#fused[@]}" "$wheels" >"$install_report" <<'PYEOF'
import json, sys, time
status, reason, start, n_main, n_fused, folder = sys.argv[1:]
print(json.dumps({"check": "install the carried wheels", "status": status, "reason": reason,
                  "figures": {"folder": folder, "wheels": int(n_main), "fused_kernel_wheels": int(n_fused)},
                  "seconds": round(time.time() - float(start), 2)}))
PYEOF
  export GPU_CHECK_INSTALL_REPORT=$install_report
else
  echo "gpu_check: no wheels in $wheels (make gpu-wheels makes them): using what $PY has installed" >&2
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
exec "$PY" scripts/gpu_check.py "$@"
