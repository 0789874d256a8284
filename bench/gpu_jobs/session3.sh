# Third GPU session (docs/RESULTS.md 1b, 1c): no kernel build (for runs this short it does not
# pay back its ~3 minutes), no device smoke (each job was tried on ML-100k on the CPU first).
# - MLSA4Rec-S continued on windows of 200 (loss at every position): the causal recipe is ~50x
#   cheaper per target than RecBole's samples, and ML-1M histories are long (median ~96);
# - the paper MLSA4Rec continued on RecBole's samples, towards convergence;
# - SASRec on RecBole's benchmark data, continued from the CPU run (windows of 50, lr 5e-4);
# - SASRec with windows of 200 and dropout 0.2 (Mamba4Rec's setting for ML-1M), from scratch;
# - Mamba4Rec on windows of 200, continued from round 1.
# START holds runs/gpu/round2/{s2,p2}.pt, runs/gpu/ml1m-mamba4rec-len200.pt as m200.pt and
# runs/ml-1m-r3k10-sasrec-lr0.0005.pt as r3k10.pt.
JOBS=(
  "mlsa4rec-s-len200-b32|--model mlsa4rec-s --max-len 200 --batch-size 32 --init-from $START/s2.pt"
  "mlsa4rec-s-len200-lr5e-4|--model mlsa4rec-s --max-len 200 --batch-size 64 --lr 0.0005 --init-from $START/s2.pt"
  "mlsa4rec-recbole-continued|--model mlsa4rec --batch-size 2048 --init-from $START/p2.pt"
  "sasrec-recbole-data-continued|--model sasrec --min-rating 3 --k-core 10 --lr 0.0005 --patience 20 --init-from $START/r3k10.pt"
  "sasrec-len200-dropout0.2|--model sasrec --max-len 200 --set dropout=0.2 --set attn_dropout=0.2 --patience 20"
  "mamba4rec-len200-continued|--model mamba4rec --max-len 200 --init-from $START/m200.pt"
)
