"""UCI MSNBC: 989,818 users, 17 page categories; prepare it first with
python data.py ../shared/data/msnbc/msnbc990928.seq.gz --out_dir=data/msnbc"""
data_dir = 'data/msnbc'
out_dir = 'out/msnbc'
max_iters = 3000
tail_weight = 1.0      # plain one-stage training in stage 1 (as measured in the README)
eval_interval = 500
log_interval = 500
eval_users = 5000
