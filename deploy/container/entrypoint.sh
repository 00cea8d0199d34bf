#!/bin/sh
# The container's entrypoint: pick the model, then become bitnetd (PID 1, foreground, logs on
# stderr). Arguments are passed to bitnetd (e.g. -v, or -t to check the configuration).
#
# The model: BITNETD_MODEL_PATH, or [model] path of the file named by BITNETD_CONFIG, or
# /models/ggml-model-i2_s.gguf when that file exists; else the demo model. A path that does not
# exist is never set here: bitnetd would refuse to start.
set -eu
if [ -z "${BITNETD_MODEL_PATH:-}" ] && [ -z "${BITNETD_CONFIG:-}" ]; then
    default=/models/ggml-model-i2_s.gguf
    if [ -f "$default" ]; then
        export BITNETD_MODEL_PATH="$default"
    else
        echo "bitnetd-entrypoint: no model at $default: serving the demo model" \
             "(random weights; mount a model directory at /models)" >&2
    fi
fi
exec bitnetd -f "$@"
