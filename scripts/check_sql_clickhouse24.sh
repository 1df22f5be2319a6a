#!/usr/bin/env bash
# Checks the migrations and the analytics query shapes on ClickHouse 24.8 (chDB); see
# scripts/check_sql_clickhouse24.py. Not part of CI: the wheel is about 575 MB.
set -euo pipefail
ROOT=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
VENV=$ROOT/target/chdb-venv
if [[ ! -x $VENV/bin/python ]]; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q chdb==2.1.1
fi
exec "$VENV/bin/python" "$ROOT/scripts/check_sql_clickhouse24.py"
