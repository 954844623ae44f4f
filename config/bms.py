"""BMS-WebView-1 (KDD Cup 2000): 59,602 sessions, 497 pages; prepare it first with
python data.py ../shared/data/bms_webview1/BMS.dat.gz --out_dir=data/bms"""
data_dir = 'data/bms'
out_dir = 'out/bms'
max_iters = 3000
tail_weight = 1.0      # plain one-stage training in stage 1 (as measured in the README)
eval_interval = 500
log_interval = 500
# stage 2, chosen on validation (harmonic mean of anchor and tail accuracy): keep the data's prior
# and stay close to stage 1; the built-in defaults (prior_keep=0.75, no KL) lowered it on BMS
prior_keep = 1.0
kl_weight = 0.5
stage2_learning_rate = 3e-4
