"""
The GPT that reads behavior logs as sentences (HeTLM: "the language of browsing").

A user's history is a sequence of page tokens framed into sessions (<bos> p1 p2 ... <eos>). The model
is nanoGPT's GPT-2 shaped decoder, trained from scratch to predict the next token:
pre-LN blocks, causal scaled_dot_product_attention, tied input/output embeddings, GPT-2 init,
weight decay only on matrices.

Differences from nanoGPT, all small:
- Batches are right-padded (rows are single users of different lengths). Causal attention means
  position t never looks at the pads after it, so right padding needs no attention mask; padded
  positions carry target -1 and are skipped.
- With targets, logits are computed only at positions that have a real target (no full-vocabulary
  logits at pads), so `forward` returns logits of shape (N, V) for those N positions.
- `cluster_ids` (one per batch row) is accepted everywhere; cluster-specific parameter sets arrive
  with the clustering issue, and n_clusters = 1 is exactly this plain GPT.

Used by: train.py (training), evaluate.py (full-ranking evaluation), sample.py (predictions).
"""

import math
import inspect
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F


@dataclass
class GPTConfig:
    block_size: int = 64      # longest context, in tokens
    vocab_size: int = 512     # specials + pages (from the tokenizer)
    n_layer: int = 2
    n_head: int = 2
    n_embd: int = 64
    dropout: float = 0.0
    bias: bool = False        # bias in Linears and LayerNorms (False: a bit better and faster, as nanoGPT)
    n_clusters: int = 1       # parameter sets (HeTLM); 1 = one plain GPT


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's has no bias=False before 2.1 everywhere)."""

    def __init__(self, ndim, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be divisible by n_head"
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.dropout = config.dropout

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                           is_causal=True)                # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.vocab_size is not None and config.block_size is not None
        if config.n_clusters != 1:
            raise NotImplementedError("cluster-specific parameter sets (n_clusters > 1) are not implemented yet")
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # weight tying: a page's input embedding is its output embedding, so a page seen only in
        # contexts still gets a useful output vector (https://paperswithcode.com/method/weight-tying)
        self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        # GPT-2: scaled init of the residual projections
        for pn, p in self.named_parameters():
            if pn.endswith('c_proj.weight'):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def get_num_params(self, non_embedding=True):
        """Parameter count; the position embeddings are subtracted by default, as nanoGPT
        (the token embeddings are tied to the head, so they count once as head weights)."""
        n_params = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n_params -= self.transformer.wpe.weight.numel()
        return n_params

    def hidden_states(self, idx, cluster_ids=None):
        """(B, T) token ids -> (B, T, C) hidden states after the final LayerNorm."""
        B, T = idx.size()
        assert T <= self.config.block_size, f"sequence of length {T} > block_size {self.config.block_size}"
        pos = torch.arange(0, T, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        for block in self.transformer.h:
            x = block(x)
        return self.transformer.ln_f(x)

    def head(self, h, cluster_ids=None):
        """(..., C) hidden states -> (..., V) logits."""
        return self.lm_head(h)

    def forward(self, idx, targets=None, cluster_ids=None, class_weight=None, logit_bias=None):
        """class_weight (V,): loss weight of each target class (BehaviorLM's anchor/tail weighting,
        class-balanced loss); the loss is the weighted mean, as F.cross_entropy(weight=...).
        logit_bias (V,): added to the logits inside the loss only (training on a re-sampled subset
        while keeping the data's prior, as the balanced softmax of Ren et al., 2020)."""
        h = self.hidden_states(idx, cluster_ids)           # (B, T, C)
        if targets is None:
            return self.head(h, cluster_ids), None          # (B, T, V)
        keep = targets != -1                                # (B, T) real targets only
        rows = keep.nonzero(as_tuple=True)[0]
        cid = None if cluster_ids is None else cluster_ids[rows]
        logits = self.head(h[keep], cid)                    # (N, V): no logits at pads
        z = logits.float() if logit_bias is None else logits.float() + logit_bias
        t = targets[keep]
        if t.numel() == 0 or (class_weight is not None and not class_weight[t].any()):
            loss = z.sum() * 0.0                           # nothing to learn here: 0, not NaN
        else:
            loss = F.cross_entropy(z, t, weight=class_weight)
        return logits, loss

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        """AdamW; decay every >= 2-D tensor (matmuls, embeddings), not biases and LayerNorm gains."""
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [{'params': decay, 'weight_decay': weight_decay},
                  {'params': no_decay, 'weight_decay': 0.0}]
        # fused AdamW runs on CPU and CUDA in recent PyTorch; fall back to foreach where it does not
        extra = {}
        if 'fused' in inspect.signature(torch.optim.AdamW).parameters and device_type in ('cpu', 'cuda'):
            extra = dict(fused=True)
        try:
            return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **extra)
        except (RuntimeError, ValueError):
            return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, foreach=True)

    def estimate_flops_per_token(self, T=None):
        """nanoGPT's estimate (PaLM appendix B): 6N + 12*L*C*T FLOPs per trained token."""
        cfg = self.config
        T = cfg.block_size if T is None else T
        return 6 * self.get_num_params() + 12 * cfg.n_layer * cfg.n_embd * T


def load_checkpoint(path, device='cpu'):
    """Load a checkpoint written by train.py -> (model in eval mode, checkpoint dict).
    Checkpoints hold only tensors and plain Python values, so weights_only=True works."""
    ckpt = torch.load(path, map_location=device, weights_only=True)
    model = GPT(GPTConfig(**ckpt['model_args']))
    model.load_state_dict(ckpt['model'])
    model.to(device)
    model.eval()
    return model, ckpt


def resolve_device(name):
    """'auto' -> cuda if available, then mps, then cpu; anything else as given."""
    if name != 'auto':
        return name
    if torch.cuda.is_available():
        return 'cuda'
    if getattr(torch.backends, 'mps', None) is not None and torch.backends.mps.is_available():
        return 'mps'
    return 'cpu'
