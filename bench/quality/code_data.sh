#!/usr/bin/env bash
# Build the code-heavy column's data (the docstrings of this machine's installed Python packages, study 1's
# corpus) with the prose pipeline: the same BPE, retrieval share, stats.json and file names, so gpu_x4.sh runs on it
# unchanged. Every knob of bench/quality/prose_data.sh applies (MAX_MB caps the corpus's text).
#   bash bench/quality/code_data.sh DATA_DIR
CORPUS=site_docs exec bash "$(dirname "$0")/prose_data.sh" "$@"
