"""The settings train.py used before it derived them from the data (up to 2026-11-22): a fixed
0.13M-parameter model and schedule, sized for the built-in shop. The figures in docs/ were measured
with them; put this file first to reproduce one (later files and --key=value still win):
python train.py config/fixed.py config/bms.py"""
block_size = 64
batch_tokens = 4096
n_layer = 2
n_head = 2
n_embd = 64
dropout = 0.1
transitions = 0        # the transition term came later (recipe.py turns it on for sparse catalogues)
sampled_softmax = 0    # and the sampled softmax (on from 10,000 pages)
learning_rate = 3e-3
min_lr = 3e-4
max_iters = 2000
warmup_iters = 100
eval_interval = 250
tail_weight = 0.5
dtype = 'float32'
time_budget = 0.0      # no time budget and no early stop: every run trains max_iters
patience = 0
