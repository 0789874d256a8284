# Third GPU session, second call (the ~4 device minutes left after session3.sh): continue the
# three runs of session3.sh that were still improving when their budget ended.
# START holds round 3's checkpoints: sd2.pt (sasrec-len200-dropout0.2), p3.pt
# (mlsa4rec-recbole-continued), m3.pt (mamba4rec-len200-continued).
JOBS=(
  "sasrec-len200-dropout0.2-continued|--model sasrec --max-len 200 --set dropout=0.2 --set attn_dropout=0.2 --patience 20 --init-from $START/sd2.pt"
  "mlsa4rec-recbole-continued2|--model mlsa4rec --batch-size 2048 --init-from $START/p3.pt"
  "mamba4rec-len200-continued2|--model mamba4rec --max-len 200 --init-from $START/m3.pt"
)
