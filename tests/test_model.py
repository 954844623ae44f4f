"""model.py: causality, right padding, loss only at real targets."""
import torch
from torch.nn import functional as F

from model import GPT, GPTConfig


def tiny(**kw):
    torch.manual_seed(0)
    cfg = dict(block_size=16, vocab_size=37, n_layer=2, n_head=2, n_embd=32, dropout=0.0)
    cfg.update(kw)
    return GPT(GPTConfig(**cfg)).eval()


def test_causal_future_tokens_do_not_change_past_logits():
    model = tiny()
    idx = torch.randint(4, 37, (3, 12))
    logits, _ = model(idx)
    changed = idx.clone()
    changed[:, 7:] = torch.randint(4, 37, (3, 5))
    logits2, _ = model(changed)
    assert torch.allclose(logits[:, :7], logits2[:, :7], atol=1e-6)
    assert not torch.allclose(logits[:, 7:], logits2[:, 7:], atol=1e-3)


def test_right_padding_leaves_real_positions_unchanged():
    model = tiny()
    idx = torch.randint(4, 37, (1, 6))
    padded = torch.cat([idx, torch.zeros(1, 5, dtype=torch.long)], dim=1)
    a, _ = model(idx)
    b, _ = model(padded)
    assert torch.allclose(a, b[:, :6], atol=1e-6)


def test_loss_is_cross_entropy_over_real_targets_only():
    model = tiny()
    idx = torch.randint(4, 37, (2, 8))
    targets = torch.randint(4, 37, (2, 8))
    targets[0, 5:] = -1
    targets[1, 0] = -1
    logits, loss = model(idx, targets)
    assert logits.shape == (int((targets != -1).sum()), 37)
    full, _ = model(idx)
    expected = F.cross_entropy(full.view(-1, 37), targets.view(-1), ignore_index=-1)
    assert torch.allclose(loss, expected, atol=1e-6)


def test_weights_are_tied_and_decay_only_on_matrices():
    model = tiny()
    assert model.transformer.wte.weight is model.lm_head.weight
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), 'cpu')
    decay, no_decay = opt.param_groups
    assert all(p.dim() >= 2 for p in decay['params']) and decay['weight_decay'] == 0.1
    assert all(p.dim() < 2 for p in no_decay['params']) and no_decay['weight_decay'] == 0.0


def test_flops_per_token_follows_nanogpt_formula():
    model = tiny()
    n = model.get_num_params()
    assert model.estimate_flops_per_token(T=10) == 6 * n + 12 * 2 * 32 * 10


def test_loss_is_zero_not_nan_without_weighted_targets():
    model = tiny()
    idx = torch.randint(4, 37, (2, 5))
    _, loss = model(idx, torch.full((2, 5), -1))
    assert loss.item() == 0.0
    w = torch.ones(37)
    w[10:] = 0.0                                   # tail_weight = 0 and a batch of tail targets only
    _, loss = model(idx, torch.full((2, 5), 20), class_weight=w)
    assert loss.item() == 0.0
    _, loss = model(idx, torch.full((2, 5), 5), class_weight=w)
    assert loss.item() > 0
