#!/usr/bin/env bash
# Sourced by the numbered stage scripts, after their variables and before their commands:
#  - the path variables (COHORT, OUT, FIT_SPLIT, WEIGHTS, CHECKPOINT, CODEX_WEIGHTS) become absolute against the
#    directory the script was started from (hf_hub:<repo> values stay as they are), and the python modules run in
#    that directory too, so relative paths in EXTRA-like variables and in the script's arguments mean the same;
#  - activates .venv when present (the project is installed there, editable: scripts/_setup_env.sh);
#    PYTHONSAFEPATH=1: a folder in the current directory never shadows the project's packages;
#  - when stderr is not a terminal (a log file, nohup, sbatch), progress bars redraw every TQDM_MININTERVAL
#    seconds (default 30) instead of ten times a second, so the log keeps one line per bar update, not thousands;
#  - `require_module mod [mod ...]`, called once by each script: with -h/--help among the script's arguments it
#    prints the script's header comment, its variables (default, comment and the value this run would use) and
#    each module's own --help, then exits 0 having run nothing; otherwise a missing module stops with exit 3.
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
for _v in COHORT OUT FIT_SPLIT WEIGHTS CHECKPOINT CODEX_WEIGHTS; do
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

_module_exists() {
  local path
  path="$_repo/$(echo "$1" | tr . /)"
  [ -f "$path.py" ] || [ -f "$path/__main__.py" ]
}

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

# require_module MODULE [MODULE ...]: the python modules this script runs (python -m MODULE).
require_module() {
  local mod
  if [ "$_want_help" = 1 ]; then
    _print_script_help
    for mod in "$@"; do
      echo
      echo "===== python -m $mod --help"
      if _module_exists "$mod"; then
        python -m "$mod" --help || echo "(python -m $mod --help failed)"
      else
        echo "(not implemented yet: python module $mod is missing in this checkout)"
      fi
    done
    exit 0
  fi
  for mod in "$@"; do
    if ! _module_exists "$mod"; then
      echo "[$(basename "$0")] stage not implemented yet: python module $mod is missing in this checkout" >&2
      exit 3
    fi
  done
}
