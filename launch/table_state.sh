#!/usr/bin/env bash
# Carry a results table's progress to another machine (or past a purged scratch disk): the light files of its
# runs only (records, prompts, scores, metrics), never the compact models, resume checkpoints or the teacher's
# outputs (megabytes per run; a finished run is read from its records without them, an unfinished one
# recomputes them).
#
#   bash launch/table_state.sh save runs/reproduce-smollm2 docs/results/reproduce_smollm2-135m.runs.tar.gz
#   bash launch/table_state.sh load docs/results/reproduce_smollm2-135m.runs.tar.gz runs/reproduce-smollm2
#
# `skeleton-ds reproduce` resumes from these alone: a skeleton whose re-tuning record matches the plan's flags
# is read back from its records (stages.pipeline.is_retuned), and the shared prompt and scores of each task and
# seed are reused by the pipeline as usual. A stage that was interrupted mid-way restarts from its beginning.
set -euo pipefail

usage() { echo "usage: $0 save RUNS_DIR ARCHIVE.tar.gz | load ARCHIVE.tar.gz RUNS_DIR" >&2; exit 2; }
[ $# -eq 3 ] || usage

case "$1" in
  save)
    runs=$2 archive=$3
    [ -d "$runs" ] || { echo "table_state: $runs is not a directory: pass the table's --output" >&2; exit 2; }
    mkdir -p "$(dirname "$archive")"
    partial="$(dirname "$archive")/.$(basename "$archive").partial"
    # sorted names and fixed owners, so an unchanged table gives the same archive contents
    tar --sort=name --owner=0 --group=0 --numeric-owner -czf "$partial" -C "$runs" \
      --exclude='*/compact' --exclude='*/checkpoints' --exclude='*/teacher.safetensors' --exclude='.*.partial' \
      --exclude='*.log' --exclude='*.log.*' .
    mv "$partial" "$archive"  # complete or absent
    echo "table_state: saved $(tar -tzf "$archive" | grep -vc '/$') files of $runs to $archive ($(du -h "$archive" | cut -f1))"
    ;;
  load)
    archive=$2 runs=$3
    [ -f "$archive" ] || { echo "table_state: no archive at $archive" >&2; exit 2; }
    mkdir -p "$runs"
    tar -xzf "$archive" -C "$runs"  # keeps the files' times: a reused stage looks as it did
    echo "table_state: loaded $archive into $runs"
    ;;
  *) usage ;;
esac
