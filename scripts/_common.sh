#!/usr/bin/env bash
# Sourced by the numbered stage scripts, after their variables and before their commands:
#  - the path variables (COHORT, OUT, FIT_SPLIT, WEIGHTS, CHECKPOINT, CODEX_WEIGHTS, EXTERNAL, EXTERNAL_OUT, TRUTH,
#    CELLS, GATING) become absolute against the directory the script was started from (hf_hub:<repo> values stay
#    as they are), and the python modules run in that directory too, so relative paths in EXTRA-like variables
#    and in the script's arguments mean the same;
#  - activates .venv when present (the project is installed there, editable: scripts/_setup_env.sh);
#    PYTHONSAFEPATH=1: a folder in the current directory never shadows the project's packages;
#  - when stderr is not a terminal (a log file, nohup, sbatch), progress bars redraw every TQDM_MININTERVAL
#    seconds (default 30) instead of ten times a second, so the log keeps one line per bar update, not thousands;
#  - `require_module mod [mod ...]`, called once by each script with the modules it runs: with -h/--help among the
#    script's arguments it prints the script's header comment, its variables (default, comment and the value this
#    run would use) and each module's own --help, then exits 0 having run nothing; otherwise it does nothing;
#  - `launch MODULE ARG...`, the one launcher of the GPU-capable stages (04-08): GPUS=0 runs `python -m MODULE ARG...`
#    (one process); GPUS>0 runs `torchrun --nnodes NNODES --nproc-per-node GPUS [TORCHRUN_ARGS] -m MODULE ARG...`,
#    with --standalone (a free local port) on one node when TORCHRUN_ARGS is empty. Torchrun flags of the stage
#    itself come first, up to `--`: `launch --max-restarts 3 -- hex.train ...`.
set -euo pipefail
_repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_script="${BASH_SOURCE[1]:-$0}"
_script="$(cd "$(dirname "$_script")" && pwd)/$(basename "$_script")"

# A relative path -> absolute against the current directory; empty, absolute and hf_hub:<repo> values unchanged.
_abs_path() {
  local p=$1
  case $p in
    "" | /* | hf_hub:*) printf '%s' "$p" ;;
    *)
      while [ "${p#./}" != "$p" ]; do p=${p#./}; done
      [ "$p" = "." ] && p=""
      printf '%s' "$PWD${p:+/$p}"
      ;;
  esac
}
for _v in COHORT OUT FIT_SPLIT WEIGHTS CHECKPOINT CODEX_WEIGHTS EXTERNAL EXTERNAL_OUT TRUTH CELLS GATING; do
  if [ -n "${!_v:-}" ]; then
    printf -v "$_v" '%s' "$(_abs_path "${!_v}")"
  fi
done

_want_help=0
for _a in "$@"; do
  case $_a in -h | --help) _want_help=1 ;; esac
done

if [ -z "${VIRTUAL_ENV:-}" ] && [ -f "$_repo/.venv/bin/activate" ]; then
  # shellcheck disable=SC1091
  source "$_repo/.venv/bin/activate"
fi
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
export PYTHONSAFEPATH=1
if [ ! -t 2 ]; then
  export TQDM_MININTERVAL=${TQDM_MININTERVAL:-30}
fi

# The script's header comment, its variables (from its own text, up to the line that sources this file) and the
# value each would have in this run.
_print_script_help() {
  local shown="${_script#"$_repo"/}" line name rest code comment default now
  local -A left=()  # definitions of each variable still to come: "now" goes under the last one
  while IFS= read -r line; do
    case $line in 'source '*) break ;; esac
    if [[ $line =~ ^([A-Z_][A-Z0-9_]*)=\$\{ ]]; then
      left[${BASH_REMATCH[1]}]=$(( ${left[${BASH_REMATCH[1]}]:-0} + 1 ))
    fi
  done <"$_script"
  while IFS= read -r line; do
    case $line in
      '#!'*) ;;
      '#'*) line=${line#\#}; printf '%s\n' "${line# }" ;;
      *) break ;;
    esac
  done <"$_script"
  echo
  echo "Variables (override from the environment, e.g. COHORT=/data/lung OUT=/scratch/hex bash $shown;"
  echo "relative paths are relative to the directory you run it from):"
  while IFS= read -r line; do
    case $line in 'source '*) break ;; esac
    if [[ $line =~ ^([A-Z_][A-Z0-9_]*)=\$\{([A-Z_][A-Z0-9_]*):-(.*)$ ]] \
        && [ "${BASH_REMATCH[1]}" = "${BASH_REMATCH[2]}" ]; then
      name=${BASH_REMATCH[1]}
      rest=${BASH_REMATCH[3]}
      code=$rest
      comment=""
      if [[ $rest == *' #'* ]]; then
        code=${rest%%' #'*}
        comment=${rest#*' #'}
        comment="# ${comment# }"
      fi
      code=${code%"${code##*[![:space:]]}"}
      default=${code%\}}
      default=${default#\"}
      default=${default%\"}
      if [ -n "$comment" ]; then printf '  %-34s %s\n' "$name=$default" "$comment"; else echo "  $name=$default"; fi
      now=${!name-}
      left[$name]=$(( ${left[$name]} - 1 ))
      if [ "${left[$name]}" -eq 0 ] && [ "$now" != "$default" ]; then
        printf '  %-34s %s\n' "" "now: ${now:-(empty)}"
      fi
    elif [[ $line =~ ^[[:space:]]+(#.*)$ ]]; then
      printf '  %-34s %s\n' "" "${BASH_REMATCH[1]}"
    fi
  done <"$_script"
}

# require_module MODULE [MODULE ...]: the python modules this script runs (python -m MODULE); answers --help.
require_module() {
  local mod
  if [ "$_want_help" = 1 ]; then
    _print_script_help
    for mod in "$@"; do
      echo
      echo "===== python -m $mod --help"
      python -m "$mod" --help || echo "(python -m $mod --help failed)"
    done
    exit 0
  fi
}

# launch [TORCHRUN_FLAG ... --] MODULE ARG...: python -m MODULE ARG... (GPUS=0) or torchrun with GPUS processes per
# node on NNODES nodes (GPUS>0); TORCHRUN_ARGS (word-split) go to torchrun after the stage's own torchrun flags.
launch() {
  local gpus=${GPUS:-0} nnodes=${NNODES:-1} own=() extra=()
  if [ "${1:-}" != "${1#-}" ]; then  # the stage's own torchrun flags, up to --
    while [ "$#" -gt 0 ] && [ "$1" != "--" ]; do own+=("$1"); shift; done
    shift
  fi
  if [ "$gpus" -eq 0 ]; then
    python -m "$@"
    return
  fi
  # shellcheck disable=SC2206
  extra=(${TORCHRUN_ARGS:-})
  if [ "$nnodes" -eq 1 ] && [ "${#extra[@]}" -eq 0 ]; then extra=(--standalone); fi  # free port: no clash
  torchrun --nnodes "$nnodes" --nproc-per-node "$gpus" ${own[@]+"${own[@]}"} ${extra[@]+"${extra[@]}"} -m "$@"
}
