#!/usr/bin/env bash
# The cluster path, end to end on one machine: a throw-away Ray head with token authentication,
# `ray job submit --working-dir .` of a small DisMax sweep, then a check of the MLflow record.
#
#   bash scripts/submit_local.sh [extra tune flags...]
#
# Uses its own token file and ports (6390, dashboard 8275), so it leaves ~/.ray and any running
# Ray alone; everything it writes goes to a fresh folder under /tmp, printed at the start.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=$(mktemp -d /tmp/ood-ray-submit.XXXXXX)
echo "work folder: $WORK"
export RAY_AUTH_MODE=token
export RAY_AUTH_TOKEN_PATH="$WORK/auth_token"
python -c "import secrets; print(secrets.token_hex(32))" > "$RAY_AUTH_TOKEN_PATH"
chmod 600 "$RAY_AUTH_TOKEN_PATH"
ray start --head --num-cpus 2 --port 6390 --dashboard-port 8275 --include-dashboard true --disable-usage-stats > "$WORK/ray-start.log" 2>&1
trap 'ray stop --force > /dev/null 2>&1 || true' EXIT
echo wrong-token > "$WORK/wrong_token"
if RAY_AUTH_TOKEN_PATH="$WORK/wrong_token" ray job list --address http://127.0.0.1:8275 > "$WORK/wrong-token.log" 2>&1; then
  echo "token authentication is not enforced: a wrong token was accepted" >&2; exit 1
fi
echo "ok: a wrong token is refused ($(grep -o 'authentication token is invalid' "$WORK/wrong-token.log" | head -1))"
start=$(date +%s)
ray job submit --address http://127.0.0.1:8275 --working-dir . -- \
  python jobs/tune_dismax.py --num-trials 4 --epochs 2 --name submit-check \
  --storage-path "$WORK/ray" --mlflow-uri "sqlite:///$WORK/mlflow.db" "$@"
echo "job finished in $(( $(date +%s) - start ))s"
python - "$WORK" <<'PY'
import sys

from mlflow.tracking import MlflowClient

work = sys.argv[1]
client = MlflowClient(f"sqlite:///{work}/mlflow.db")
exp = client.get_experiment_by_name("ood-ray")
parent = client.search_runs([exp.experiment_id], "tags.`ood_ray.kind` = 'sweep'")[0]
children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
assert parent.info.status == "FINISHED", parent.info.status
assert len(children) == 4, len(children)
print(f"ok: parent run {parent.info.run_id} FINISHED, {len(children)} trial runs, best objective {parent.data.metrics['best_objective']:.4f}, model {parent.data.tags.get('ood_ray.model_uri')}")
PY
