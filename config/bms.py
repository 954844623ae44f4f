"""BMS-WebView-1 (KDD Cup 2000): 59,602 sessions, 497 pages; prepare it first with
python data.py ../shared/data/bms_webview1/BMS.dat.gz --out_dir=data/bms"""
data_dir = 'data/bms'
out_dir = 'out/bms'
max_iters = 3000
eval_interval = 500
log_interval = 500
