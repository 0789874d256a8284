# The runs of the first GPU session (docs/RESULTS.md 1b, round 1), for bench/gpu_session.sh.
# name | `mlsa4rec train` options on ML-1M. "recbole": RecBole's samples, one per target with up
# to 50 items before it (window stride 1 for causal models), batch 2048 as RecBole's default;
# "len200": windows of 200 side by side, loss at every position, as Mamba4Rec's paper on ML-1M.
# START is the folder of the checkpoints that runs continue (it travels with the command).
JOBS=(
  "sasrec-recbole|--model sasrec --window-stride 1 --batch-size 2048"
  "mlsa4rec-recbole|--model mlsa4rec --batch-size 2048"
  "mlsa4rec-s-recbole-continued|--model mlsa4rec-s --window-stride 1 --batch-size 2048 --init-from $START/ml-1m-mlsa4rec-s.pt"
  "mlsa4rec-s-len200|--model mlsa4rec-s --max-len 200 --batch-size 64"
  "mamba4rec-len200|--model mamba4rec --max-len 200 --batch-size 64"
  "sasrec-len200|--model sasrec --max-len 200 --batch-size 64"
)
