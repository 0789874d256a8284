# The next GPU session's runs (docs/RESULTS.md 1d says why), for bench/gpu_session.sh with the
# kernel build (MAMBA_SDIST set): carry on the three runs that were still improving when the
# last session's budget ended. The kernel pays here: the paper model's epoch is ~23 s with it
# on a quiet H100 against ~50 s without, and MLSA4Rec-S on windows of 200 is bound by the
# pure-PyTorch scan's 200-step loop. START holds, copied there before the session:
#   s3.pt  runs/gpu/round3/ml1m-mlsa4rec-s-len200-lr5e-4.pt (MLSA4Rec-S, windows of 200)
#   p3.pt  runs/gpu/round3b/ml1m-mlsa4rec-recbole-continued2.pt (paper model, 16 epochs)
#   m3.pt  runs/gpu/round3b/ml1m-mamba4rec-len200-continued2.pt (Mamba4Rec, 39 epochs)
# SASRec is not here: with dropout 0.2 it stopped early (1d); RecBole's own SASRec run (its
# data, samples, batch 4096, lr 5e-4, ~200 epochs) needs more than one 15-minute session.
JOBS=(
  "mlsa4rec-s-len200-continued|--model mlsa4rec-s --max-len 200 --batch-size 64 --lr 0.0005 --init-from $START/s3.pt"
  "mlsa4rec-recbole-continued|--model mlsa4rec --batch-size 2048 --init-from $START/p3.pt"
  "mamba4rec-len200-continued|--model mamba4rec --max-len 200 --init-from $START/m3.pt"
)
