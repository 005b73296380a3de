#!/usr/bin/env bash
# Prints the folder cargo builds into for this workspace: `target/` by default, or wherever
# CARGO_TARGET_DIR, a .cargo/config.toml `build.target-dir` or CARGO_BUILD_TARGET_DIR
# sends it. The quickstart and the test command use it to find the binary they just built
# (a hard-coded `target/` fails as soon as one of those is set).
#
#   bash scripts/cargo-target-dir.sh      # -> /home/me/idsync/target
#
# It asks `cargo metadata --no-deps` (no build, no network) and reads `target_directory`
# from its JSON with sed, so that nothing beyond cargo and coreutils is needed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
meta="$(cargo metadata --format-version 1 --no-deps)"
dir="$(printf '%s\n' "$meta" | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')"
if [[ -z "$dir" ]]; then
    echo "cargo-target-dir.sh: cargo metadata printed no target_directory" >&2
    exit 1
fi
printf '%s\n' "$dir"
