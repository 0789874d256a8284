# The next GPU session's runs (docs/RESULTS.md 1b and 1c say why), for bench/gpu_session.sh:
# carry on the two MLSA4Rec runs that were still improving, and train SASRec exactly as
# RecBole's benchmark table did (its data, samples, batch 4096, lr 5e-4) to settle section 1c.
# START holds runs/gpu/round2/{s2,p2}.pt, copied there before the session.
JOBS=(
  "mlsa4rec-s-recbole-continued|--model mlsa4rec-s --window-stride 1 --batch-size 2048 --init-from $START/s2.pt"
  "mlsa4rec-recbole-continued|--model mlsa4rec --batch-size 2048 --init-from $START/p2.pt"
  "sasrec-recbole-data|--model sasrec --min-rating 3 --k-core 10 --window-stride 1 --batch-size 4096 --lr 0.0005"
)
