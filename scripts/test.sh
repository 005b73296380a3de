#!/usr/bin/env bash
# The test command (README): everything CI checks, runnable on a fresh Debian machine.
# Installs what the tests need, then: formatting, lints, every unit and integration test
# (the integration tests drive the real idsync binary), and the quickstart as a smoke test.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n== %s\n' "$*"; }

# Notifications tests: a real SMTP server (Debian's aiosmtpd, run with /usr/bin/python3).
if ! /usr/bin/python3 -c 'import aiosmtpd' >/dev/null 2>&1; then
  step "installing python3-aiosmtpd"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-aiosmtpd >/dev/null
fi
# The repository tests read the file from outside with the sqlite3 shell, as operators do.
if ! command -v sqlite3 >/dev/null 2>&1; then
  step "installing sqlite3"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq sqlite3 >/dev/null
fi
# The JSON-log test runs the jq filter docs/operations.md shows.
if ! command -v jq >/dev/null 2>&1; then
  step "installing jq"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq jq >/dev/null
fi
# The LDAP tests run a private slapd (ldap-utils for their changes, openssl for a test CA).
if ! command -v slapd >/dev/null 2>&1 && ! [ -x /usr/sbin/slapd ] || ! command -v ldapmodify >/dev/null 2>&1 || ! command -v openssl >/dev/null 2>&1; then
  step "installing slapd, ldap-utils and openssl"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq slapd ldap-utils openssl >/dev/null
  # Only the tests' private instances are wanted; stop the one the package may start.
  (service slapd stop || true) >/dev/null 2>&1
fi

# The PostgreSQL harness (crates/testkit) runs a private server: Debian's server programs.
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  step "installing postgresql"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq postgresql >/dev/null
  # Only the tests' private clusters are wanted; stop the one the package may start.
  (service postgresql stop || true) >/dev/null 2>&1
fi

step "cargo fmt --check"
echo "(the first build below compiles a couple of hundred crates: several minutes on a fresh machine)"
cargo fmt --all -- --check

step "cargo clippy (warnings are errors)"
cargo clippy --workspace --all-targets -- -D warnings

step "tests"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast
else
  cargo test --workspace --no-fail-fast
fi

step "the same engine, situation, sequence, crash and timer tests on PostgreSQL (a private server each)"
# IDSYNC_TEST_REPOSITORY=postgres makes the engine's unit tests and the binary's sandboxes
# keep their repository in a private PostgreSQL database instead of SQLite.
# (With nextest, one run over the whole workspace and a filter: the same build as above,
# nothing compiled again for another feature set.)
if cargo nextest --version >/dev/null 2>&1; then
  IDSYNC_TEST_REPOSITORY=postgres cargo nextest run --workspace --no-fail-fast \
    -E '(package(idsync-engine) & kind(lib)) | binary(situations) | binary(sequences) | binary(crash) | binary(timers)'
else
  IDSYNC_TEST_REPOSITORY=postgres cargo test --no-fail-fast -p idsync-engine --lib
  IDSYNC_TEST_REPOSITORY=postgres cargo test --no-fail-fast -p idsync \
    --test situations --test sequences --test crash --test timers
fi

step "quickstart (smoke test with the debug binary, in a temporary copy)"
cargo build -q
# The script works in a folder beside itself: run a copy, so the source tree stays untouched
# (and two runs of this script at once do not share a work folder).
quickstart="$(mktemp -d)"
trap 'rm -rf "$quickstart"' EXIT
cp -R examples/quickstart/. "$quickstart/"
rm -rf "$quickstart/work"
# Wherever cargo put it: CARGO_TARGET_DIR or .cargo/config.toml may move target/.
IDSYNC_BIN="$(bash scripts/cargo-target-dir.sh)/debug/idsync" bash "$quickstart/run.sh" >/dev/null

step "all checks passed"
