"""BMS-WebView-1 in about a minute: a one-layer model without dropout at a higher learning rate,
selected on validation NDCG@10 against the wall clock (README "Performance"). Sessions here are 1-3
pages, so the previous page carries most of the signal and a second layer bought nothing per
second; config/bms.py is the slower preset with the better test score. Prepare the data first:
python data.py ../shared/data/bms_webview1/BMS.dat.gz --out_dir=data/bms"""
data_dir = 'data/bms'
out_dir = 'out/bms_fast'
tail_weight = 1.0      # plain one-stage training, as config/bms.py
n_layer = 1
dropout = 0.0
learning_rate = 5e-3
min_lr = 5e-4
max_iters = 1200
eval_interval = 400
log_interval = 200
