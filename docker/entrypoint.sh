#!/usr/bin/env bash
# The image's entry point: `docker run IMAGE train CONFIG ...` runs `dlm train CONFIG ...`.
# A shell, python or torchrun as the first argument runs as given (debugging, custom launches).
# pyxis/enroot on slurm do not use the entry point: `dlm launch --mode slurm` runs torchrun.
set -euo pipefail
case "${1:-}" in
bash | sh | python | python3 | torchrun) exec "$@" ;;
*) exec dlm "$@" ;;
esac
