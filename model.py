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
  logits at pads), so `forward` returns logits of shape (N, V) for those N positions; training
  asks for the loss alone (return_logits=False), computed in cache-sized row chunks that also form
  the gradients (ChunkedCrossEntropy), so no (N, V) logits exist even for 200,000 pages.
- HeTLM's cluster-specific parameter sets: every weight of a chosen scope is stacked n_clusters
  times and `cluster_ids` (one per batch row) picks the set; n_clusters = 1 is exactly this plain
  GPT. hetlm.matched_single_config sizes the equal-parameter single model, runtime.expand_state
  warm-starts the sets from a one-set checkpoint.

Used by: train.py (training), evaluate.py (full-ranking evaluation), sample.py (predictions).
"""

import math
import inspect
import numbers
from contextlib import nullcontext
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
from torch.nn import functional as F

from configurator import ConfigError
from tokenizer import N_SPECIAL, PAD, UNK


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
    cluster_scope: str = 'all'  # 'all': each cluster owns every weight (K independent models);
                                # 'blocks': shared embeddings and head, per-cluster transformer blocks;
                                # 'norms': shared weights, per-cluster LayerNorm gains and output bias
    repeat_bias: bool = False # the repeat term: pages already in the context get a learned logit bias by
                              # the age of their latest visit (GPT.repeat_terms); False in older checkpoints
    repeat_decay: bool = False  # and a learned weight on log(sum of gamma^age over all their visits),
                                # gamma learned too (the recency baseline's own form); needs repeat_bias
    transitions: int = 0      # the transition term: the pages that followed the last token in the training
                              # data (up to this many per token) get a learned logit bias by their count
                              # (GPT.transition_terms; the table from set_transitions); 0 = none


class SetLinear(nn.Module):
    """A Linear layer with n_sets stacked weight sets: forward(x, k) uses set k (HeTLM's
    cluster-specific parameters). With n_sets = 1 the weight is the plain (out, in) matrix, so a
    K = 1 model is exactly nanoGPT's GPT, state-dict keys included."""

    def __init__(self, fin, fout, bias, n_sets=1):
        super().__init__()
        lead = (n_sets,) if n_sets > 1 else ()
        self.weight = nn.Parameter(torch.empty(*lead, fout, fin))
        self.bias = nn.Parameter(torch.zeros(*lead, fout)) if bias else None
        # nn.Linear's own default init (GPT._init_weights overwrites it): it keeps the random
        # stream, and so a seeded K = 1 model, identical to one built from nn.Linear
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            nn.init.uniform_(self.bias, -1 / math.sqrt(fin), 1 / math.sqrt(fin))

    def forward(self, x, k=0):
        w = self.weight if self.weight.dim() == 2 else self.weight[k]
        b = self.bias if self.bias is None or self.bias.dim() == 1 else self.bias[k]
        return F.linear(x, w, b)


class SetEmbedding(nn.Module):
    """nn.Embedding with n_sets stacked tables (n_sets = 1: the plain (num, dim) table)."""

    def __init__(self, num, dim, n_sets=1):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(*((n_sets,) if n_sets > 1 else ()), num, dim))
        nn.init.normal_(self.weight)  # as nn.Embedding (overwritten by GPT._init_weights)

    def forward(self, idx, k=0):
        return F.embedding(idx, self.weight if self.weight.dim() == 2 else self.weight[k])


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias and n_sets stacked parameter sets."""

    def __init__(self, ndim, bias, n_sets=1):
        super().__init__()
        lead = (n_sets,) if n_sets > 1 else ()
        self.weight = nn.Parameter(torch.ones(*lead, ndim))
        self.bias = nn.Parameter(torch.zeros(*lead, ndim)) if bias else None

    def forward(self, x, k=0):
        if torch.is_tensor(k) and self.weight.dim() == 2:   # k: one set per row (B,) of a mixed batch
            y = F.layer_norm(x, x.shape[-1:], None, None, 1e-5) * self.weight[k][:, None, :]
            return y if self.bias is None else y + self.bias[k][:, None, :]
        w = self.weight if self.weight.dim() == 1 else self.weight[k]
        b = self.bias if self.bias is None or self.bias.dim() == 1 else self.bias[k]
        return F.layer_norm(x, w.shape, w, b, 1e-5)


class CausalSelfAttention(nn.Module):

    def __init__(self, config, n_sets=1):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be divisible by n_head"
        self.c_attn = SetLinear(config.n_embd, 3 * config.n_embd, config.bias, n_sets)
        self.c_proj = SetLinear(config.n_embd, config.n_embd, config.bias, n_sets)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.dropout = config.dropout

    def forward(self, x, k=0, cache=None, last=False):
        """last: the last position's output only (its query sees every key): (B, 1, C)."""
        B, T, C = x.size()
        q, kk, v = self.c_attn(x, k).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        kk = kk.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        if last:
            q, T = q[:, :, -1:], 1
        mask = None
        if cache is not None:   # generation (KVCache): this layer's keys and values so far, kept
            if 'k' in cache:
                kk, v = torch.cat([cache['k'], kk], dim=2), torch.cat([cache['v'], v], dim=2)
            cache['k'], cache['v'] = kk, v
            mask = cache.get('mask')     # (B, 1, 1, S): the keys each row sees (None: the prompt, causal)
        fp32_attention = q.device.type == 'cpu' and torch.is_autocast_enabled('cpu')
        with torch.autocast('cpu', enabled=False) if fp32_attention else nullcontext():
            # under bf16 autocast on CPU, attention itself runs in fp32: its bf16 backward measured
            # 3-4x slower than fp32 on an AMX Xeon (bench.py), while the matmuls around it gain
            if fp32_attention:
                q, kk, v = q.float(), kk.float(), v.float()
            y = F.scaled_dot_product_attention(q, kk, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0,
                                               is_causal=mask is None and not last)    # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y, k))


class MLP(nn.Module):

    def __init__(self, config, n_sets=1):
        super().__init__()
        self.c_fc = SetLinear(config.n_embd, 4 * config.n_embd, config.bias, n_sets)
        self.c_proj = SetLinear(4 * config.n_embd, config.n_embd, config.bias, n_sets)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, k=0):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x, k)), k))


class Block(nn.Module):

    def __init__(self, config, n_sets=1, n_norm_sets=None):
        super().__init__()
        n_norm_sets = n_sets if n_norm_sets is None else n_norm_sets
        self.ln_1 = LayerNorm(config.n_embd, config.bias, n_norm_sets)
        self.attn = CausalSelfAttention(config, n_sets)
        self.ln_2 = LayerNorm(config.n_embd, config.bias, n_norm_sets)
        self.mlp = MLP(config, n_sets)

    def forward(self, x, k=0, cache=None, last=False):
        x = (x[:, -1:] if last else x) + self.attn(self.ln_1(x, k), k, cache, last)
        x = x + self.mlp(self.ln_2(x, k), k)
        return x


LOSS_CHUNK = 1 << 18  # logits per row chunk of ChunkedCrossEntropy: 1 MB in fp32, so a chunk's logits
                      # stay in a core's L2 cache through softmax and both gradient matmuls (tiny
                      # preset on a Xeon: 217 ms/step at 2^18, 354 ms at 2^22); big vocabularies use
                      # at least BIG_VOCAB_ROWS rows, so the (V, C) head is streamed fewer times
BIG_VOCAB_ROWS = 256
LOW_PRECISION_ROWS = 256


class ChunkedCrossEntropy(torch.autograd.Function):
    """sum_i w_i * CE(h_i @ W.T + bias, t_i) without the (N, V) logits: rows are processed in chunks
    (LOSS_CHUNK), and the gradients w.r.t. h and W are formed in the same pass (the
    softmax of a chunk is turned into its gradient in place), so backward only scales them. Peak
    memory is one chunk, not N x V: a 200,000-page vocabulary trains in a few hundred MB.
    Under autocast the matmuls run in the autocast dtype with fp32 softmax and accumulation.
    bias: None, (V,) for every row, or (K, V) with bias_rows (N,) choosing each row's bias (a
    shared head with per-cluster page biases: one pass, one gradient buffer, whatever the mix).
    rep_pages, rep_vals (N, *): a sparse term added to each row's logits (GPT.sparse_terms; the
    values are differentiable, their gradient is the logits' gradient gathered at the pages).
    zt (N,): the sampled softmax (GPT._sampled_loss): W holds the drawn pages only, each row's
    target scores zt (differentiable, from outside) beside them, and t is the column to leave out
    (the target drawn again; -1 for none).
    Returns (weighted sum, per-row losses); only the sum is differentiable."""

    @staticmethod
    def forward(ctx, h, W, t, w, bias, need_grad, bias_rows=None, rep_pages=None, rep_vals=None, zt=None):
        N, V = h.size(0), W.size(0)
        n_rows = N
        cdt = torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type) else torch.float32
        with torch.autocast(h.device.type, enabled=False):
            Wc = W.to(cdt)
            rows = max(16, LOSS_CHUNK // V) if V <= LOSS_CHUNK // 16 else BIG_VOCAB_ROWS
            if cdt != torch.float32:   # fewer, larger chunks: each one adds a (V, C) product into gW
                rows = max(rows, LOW_PRECISION_ROWS)
                # and every chunk of the same size: oneDNN builds (and caches) bf16 kernels per shape,
                # and a last chunk of N % rows rows is a new shape nearly every batch; the padding
                # rows weigh 0, so they add nothing to the loss or the gradients. A batch smaller than
                # one chunk (a small vocabulary) is one chunk of N rounded up to LOW_PRECISION_ROWS,
                # not padded to a whole chunk: a few shapes, none of them mostly padding
                rows = min(rows, max(1, -(-N // LOW_PRECISION_ROWS)) * LOW_PRECISION_ROWS)
                pad = -N % rows
                if pad:
                    h = torch.cat([h, h.new_zeros(pad, h.size(1))])
                    t, w = torch.cat([t, t.new_zeros(pad)]), torch.cat([w, w.new_zeros(pad)])
                    if bias_rows is not None:
                        bias_rows = torch.cat([bias_rows, bias_rows.new_zeros(pad)])
                    if rep_pages is not None:
                        rep_pages = torch.cat([rep_pages, rep_pages.new_zeros(pad, rep_pages.size(1))])
                        rep_vals = torch.cat([rep_vals, rep_vals.new_zeros(pad, rep_vals.size(1))])
                    if zt is not None:
                        zt = torch.cat([zt, zt.new_zeros(pad)])
                    N = N + pad
            losses = torch.empty(N, dtype=torch.float32, device=h.device)
            gh = torch.empty(N, h.size(1), dtype=torch.float32, device=h.device) if need_grad else None
            gW = torch.zeros(V, W.size(1), dtype=torch.float32, device=h.device) if need_grad else None
            gb = (torch.zeros(bias.shape, dtype=torch.float32, device=h.device)
                  if need_grad and bias is not None and ctx.needs_input_grad[4] else None)   # not for constant offsets
            gr = torch.empty(rep_vals.shape, dtype=torch.float32, device=h.device) if need_grad and rep_vals is not None else None
            gzt = torch.empty(N, dtype=torch.float32, device=h.device) if need_grad and zt is not None else None
            for s in range(0, N, rows):
                hc, tc = h[s:s + rows].to(cdt), t[s:s + rows]
                z = (hc @ Wc.t()).float()                                  # (rows, V)
                if bias is not None:
                    z += bias if bias_rows is None else bias[bias_rows[s:s + rows]]
                if rep_pages is not None:
                    z.scatter_add_(1, rep_pages[s:s + rows], rep_vals[s:s + rows].float())
                if zt is None:
                    zy = z.gather(1, tc[:, None])                          # the targets' scores
                    mx = z.amax(dim=1, keepdim=True)
                else:   # sampled: the target's score from outside, its drawn column left out
                    zy = zt[s:s + rows, None].float()
                    drawn = tc >= 0
                    z[drawn.nonzero().flatten(), tc[drawn]] = -math.inf
                    mx = torch.maximum(z.amax(dim=1, keepdim=True), zy)
                z.sub_(mx).exp_()                                          # in place: one pass
                se = z.sum(dim=1, keepdim=True)
                if zt is not None:
                    et = (zy - mx).exp()
                    se = se + et
                losses[s:s + rows] = (mx + se.log() - zy).squeeze(1)       # logsumexp - z_t
                if need_grad:   # d/dz of w * CE = w * (softmax(z) - onehot(t))
                    wc = w[s:s + rows, None]
                    z.mul_(wc / se)
                    if zt is None:
                        z.scatter_add_(1, tc[:, None], -wc)
                    else:
                        gzt[s:s + rows] = (wc * (et / se - 1)).squeeze(1)
                    if gb is not None and bias_rows is None:
                        gb += z.sum(dim=0)
                    elif gb is not None:
                        gb.index_add_(0, bias_rows[s:s + rows], z)
                    if gr is not None:
                        gr[s:s + rows] = z.gather(1, rep_pages[s:s + rows])
                    if cdt == torch.float32:
                        torch.mm(z, Wc, out=gh[s:s + rows])
                        gW.addmm_(z.t(), hc)
                    else:
                        zc = z.to(cdt)
                        gh[s:s + rows] = zc @ Wc
                        gW += zc.t() @ hc
        losses, w = losses[:n_rows], w[:n_rows]                            # without the padding rows
        ctx.save_for_backward(None if gh is None else gh[:n_rows], gW, gb, None if gr is None else gr[:n_rows],
                              None if gzt is None else gzt[:n_rows])
        ctx.dtypes = (h.dtype, W.dtype)
        ctx.mark_non_differentiable(losses)
        return (losses * w).sum(), losses

    @staticmethod
    def backward(ctx, g, _):
        gh, gW, gb, gr, gzt = ctx.saved_tensors
        if gh is None:
            raise RuntimeError("ChunkedCrossEntropy: gradients were not formed (forward ran without grad)")
        return ((gh * g).to(ctx.dtypes[0]), (gW * g).to(ctx.dtypes[1]), None, None, None if gb is None else gb * g,
                None, None, None, None if gr is None else gr * g, None if gzt is None else gzt * g)


REPEAT_BUCKETS = 12   # ages of a page's latest visit: 1 (the last page), 2, 3, 4, 5-8, 9-16, ..., 257-512, more
REPEAT_LR_SCALE = 10  # the repeat weights' learning rate, times the run's: a handful of logit offsets that
                      # may need to move by several units (about 1 per 1,000 steps at 1e-3 otherwise)


AGE_EDGES = (1, 2, 3, 4, 8, 16, 32, 64, 128, 256, 512)   # a bucket holds the ages up to its edge
MAX_TRANSITIONS = 1024  # successors kept per token by the transition term, at most (a (V, width) table)


def age_bucket(age):
    """(...) ages >= 1 (long) -> their bucket in [0, REPEAT_BUCKETS): 1-4 alone, then powers of two
    (5-8, 9-16, ...), in integers (no float64: MPS has none)."""
    edges = torch.tensor(AGE_EDGES, dtype=age.dtype, device=age.device)
    return torch.bucketize(age, edges).clamp(max=REPEAT_BUCKETS - 1)


SCOPES = ('all', 'blocks', 'norms')  # what each cluster owns: everything (K independent models),
                                     # the blocks, or only the LayerNorms and a bias over the pages


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        check_gpt_config(config)
        self.config = config
        self.last_nll = None   # plain NLL of the last chunked loss (forward's docstring)
        K = config.n_clusters
        scope = config.cluster_scope
        k_emb = K if scope == 'all' else 1                     # embeddings and head
        k_blk = 1 if scope == 'norms' else K                   # transformer block weights
        k_ln = 1 if scope == 'blocks' else K                   # final LayerNorm
        self.transformer = nn.ModuleDict(dict(
            wte=SetEmbedding(config.vocab_size, config.n_embd, k_emb),
            wpe=SetEmbedding(config.block_size, config.n_embd, k_emb),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, k_blk, K) for _ in range(config.n_layer)]),
            ln_f=LayerNorm(config.n_embd, config.bias, k_ln),
        ))
        self.lm_head = SetLinear(config.n_embd, config.vocab_size, False, k_emb)
        # 'norms': each cluster's own bias over the pages (its prior), on top of the shared head
        self.page_bias = nn.Parameter(torch.zeros(K, config.vocab_size)) if scope == 'norms' and K > 1 else None
        # the repeat term (repeat_terms): one logit offset per age bucket of a page's latest visit in the
        # context, and a weight on log(visits); shared by every parameter set
        self.repeat_w = nn.Parameter(torch.zeros(REPEAT_BUCKETS + 1)) if config.repeat_bias else None
        # [logit of gamma, weight]: gamma starts at 0.8, the weight at 0 (the term starts off)
        self.repeat_d = (nn.Parameter(torch.tensor([math.log(0.8 / 0.2), 0.0]))
                         if config.repeat_bias and config.repeat_decay else None)
        # the transition term (transition_terms): [weight of the lift, log beta, one offset per count
        # bucket], all 0 at the start (the term starts off); the table is data, not learned: buffers
        # filled by set_transitions and kept in the checkpoint, so a model scores without its data
        self.trans_w = nn.Parameter(torch.zeros(REPEAT_BUCKETS + 2)) if config.transitions else None
        if config.transitions:
            V, S = config.vocab_size, config.transitions
            self.register_buffer('trans_next', torch.zeros(V, S, dtype=torch.int32))  # successors, most frequent first
            self.register_buffer('trans_count', torch.zeros(V, S))                    # their training counts (0: none)
            self.register_buffer('trans_logpop', torch.zeros(V))                      # log p_pop of each page
        # weight tying: a page's input embedding is its output embedding, so a page seen only in
        # contexts still gets a useful output vector (https://paperswithcode.com/method/weight-tying)
        self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        # GPT-2: scaled init of the residual projections
        for pn, p in self.named_parameters():
            if pn.endswith('c_proj.weight'):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, (SetLinear, SetEmbedding)):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if getattr(module, 'bias', None) is not None:
                torch.nn.init.zeros_(module.bias)

    def _groups(self, cluster_ids, n):
        """[(rows or None for all, set k)]: one group per cluster present among n rows."""
        if self.config.n_clusters == 1:
            return [(None, 0)]
        if cluster_ids is None:
            raise ValueError(f"this model has {self.config.n_clusters} parameter sets: pass cluster_ids")
        cid = torch.as_tensor(cluster_ids).reshape(-1).cpu()
        assert len(cid) == n, f"{len(cid)} cluster ids for {n} rows"
        present = torch.unique(cid)
        if len(present) == 1:                              # the common case: a one-cluster batch
            return [(None, int(present[0]))]
        return [((cid == k).nonzero().flatten(), int(k)) for k in present]

    def get_num_params(self, non_embedding=True):
        """Parameter count; the position embeddings are subtracted by default, as nanoGPT
        (the token embeddings are tied to the head, so they count once as head weights)."""
        n_params = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n_params -= self.transformer.wpe.weight.numel()
        return n_params

    def hidden_states(self, idx, cluster_ids=None, last=False):
        """(B, T) token ids -> (B, T, C) hidden states after the final LayerNorm; row b uses the
        parameter set cluster_ids[b] (a batch may mix clusters: rows are grouped by set).
        last: the last position's only, (B, 1, C) (the last block's queries and MLP run there only)."""
        B, T = idx.size()
        assert T <= self.config.block_size, f"sequence of length {T} > block_size {self.config.block_size}"
        groups = self._groups(cluster_ids, B)
        if len(groups) > 1 and self.config.cluster_scope == 'norms':   # only the gains differ: one pass
            return self._trunk(idx, torch.as_tensor(cluster_ids, dtype=torch.long, device=idx.device).reshape(-1),
                               last=last)
        if len(groups) > 1:
            out = None
            for rows, k in groups:
                h = self._trunk(idx[rows.to(idx.device)], k, last=last)
                out = h.new_empty(B, *h.shape[1:]) if out is None else out
                out[rows.to(idx.device)] = h
            return out
        return self._trunk(idx, groups[0][1], last=last)

    def _trunk(self, idx, k, pos=None, caches=None, last=False):
        """pos: each token's position (default 0..T-1); caches: one dict per layer (KVCache);
        last: the last block at the last position only."""
        t = self.transformer
        if pos is None:
            pos = torch.arange(0, idx.size(1), dtype=torch.long, device=idx.device)
        x = t.drop(t.wte(idx, k) + t.wpe(pos, k))          # (B, T, C)
        for i, block in enumerate(t.h):
            x = block(x, k, None if caches is None else caches[i], last and i == len(t.h) - 1)
        return t.ln_f(x, k)

    def head(self, h, cluster_ids=None):
        """(N, C) or (B, T, C) hidden states -> logits (..., V); cluster_ids has one id per row."""
        groups = self._groups(cluster_ids, h.size(0))
        if len(groups) == 1:
            return self._head(h, groups[0][1])
        out = None
        for rows, k in groups:
            rows = rows.to(h.device)
            z = self._head(h[rows], k)                      # bf16 under autocast
            out = z.new_empty(*h.shape[:-1], self.config.vocab_size) if out is None else out
            out[rows] = z
        return out

    def _head(self, h, k):
        z = self.lm_head(h, k)
        return z if self.page_bias is None else z + self.page_bias[k].to(z.dtype)

    def _scored(self, idx, at, keep):
        """The positions whose next token is scored, as pairs (rows b, positions i), both (M,), and
        the shape their terms take: every position (B, T), at (B, n), or the positions keep (B, T)
        marks, in its order (N,)."""
        B, T = idx.shape
        if keep is not None:
            b, i = keep.nonzero(as_tuple=True)
            return b, i, (len(b),)
        n = T if at is None else at.size(1)
        b = torch.arange(B, device=idx.device).repeat_interleave(n)
        i = torch.arange(T, device=idx.device).repeat(B) if at is None else at.reshape(-1)
        return b, i, (B, n)

    def repeat_stats(self, idx):
        """What the repeat term reads at each position j of idx (B, T): nxt, the position of the
        page's next visit (T if none), its visits up to j, and R[j] = sum over its visits k <= j of
        gamma^(j - k) (None without repeat_decay), all (B, T). sessions.KVCache keeps them up to
        date a token at a time instead of recomputing them over the whole window."""
        B, T = idx.shape
        ar = torch.arange(T, device=idx.device)
        same = idx[:, :, None] == idx[:, None, :]                                  # (B, T, T) symmetric
        later = ar[None, :] > ar[:, None]                                          # [j, k]: k after j
        again = same & later
        nxt = torch.where(again.any(2), again.to(torch.uint8).argmax(2), T)         # (B, T) j's next visit
        visits = (same & ~later.T).sum(1)                                          # (B, T) visits up to j
        R = None
        if self.repeat_d is not None:   # exact in fp32 whatever the ages, elementwise (no bf16 matmul)
            R = (same.float() * self.decay_table(T)).sum(2)                        # (B, T)
        return nxt, visits, R

    def decay_table(self, T):
        """(T, T) [j, k]: gamma^(j - k) where k <= j, else 0 (the repeat term's decay, gamma learned)."""
        lag = torch.arange(T, device=self.repeat_d.device).float()
        lag = lag[:, None] - lag[None, :]
        return torch.where(lag >= 0, (lag.clamp(min=0) * F.logsigmoid(self.repeat_d[0].float())).exp(), 0.0)

    def repeat_terms(self, idx, at=None, keep=None, stats=None):
        """The repeat term, as RepeatNet's repeat mode (Ren et al., 2019) but added to the logits: a
        page already in the context gets repeat_w[age bucket of its latest visit] + repeat_w[-1] *
        log(its visits so far), learned with the loss. A GPT with tied embeddings can echo its context
        through attention, but not easily say "never again" (a rating log, where each item is rated
        once) or "the page I was just on, again" (a repeat-heavy log); two offsets can.
        idx (B, T); at (B, n): the positions whose next token is scored (None: every position), or
        keep (B, T): the positions with a training target; stats: repeat_stats(idx), if known.
        Returns (pages, values), both (B, n, T) ((N, T) with keep): add with
        logits.scatter_add(-1, pages, values); entry j is the page at position j, its value 0
        unless that is the page's latest visit up to the scored position. None if the model has none."""
        if self.repeat_w is None:
            return None
        T = idx.size(1)
        nxt, visits, R = self.repeat_stats(idx) if stats is None else stats
        # the scored pairs (b, i), each a row of T entries: the per-row quantities are gathered by b
        # and the (T, T) tables by i, so only the scored positions are computed (a training batch's
        # padding is not) and the age buckets' gradient sums over a T x T table
        b, i, shape = self._scored(idx, at, keep)
        ar = torch.arange(T, device=idx.device)
        pages = idx[b]                                                             # (M, T)
        live = (ar[None, :] <= i[:, None]) & (nxt[b] > i[:, None]) & (pages >= N_SPECIAL)
        lag = ar[:, None] - ar[None, :]                                            # (T, T): [i, j] = i - j
        w = self.repeat_w
        # (index_select, not indexing: on CPU its gradient adds in order, where indexing's scatters in
        # parallel past a size and the weights' gradients would change from run to run in the last bits)
        table = w.index_select(0, age_bucket(lag + 1).reshape(-1)).view(T, T)       # (T, T) by age i - j + 1
        vals = table.index_select(0, i) + (w[-1] * visits.float().log()).index_select(0, b)
        if self.repeat_d is not None:   # + v * log(sum over the page's visits k <= i of gamma^(i - k))
            # = v * ((i - j) log gamma + log R[j]) at the latest visit j, R[j] >= 1
            log_gamma = F.logsigmoid(self.repeat_d[0].float())
            vals = vals + self.repeat_d[1] * (lag.float()[i] * log_gamma + R.log().index_select(0, b))
        vals = torch.where(live, vals, 0.0)
        return pages.view(*shape, T), vals.view(*shape, T)

    @torch.no_grad()
    def set_transitions(self, nxt, count, p_pop):
        """The transition term's table, from the training data (baselines.transition_table): nxt,
        count (V, width) each token's most frequent successors and their counts (0 past its last),
        p_pop (V,) each page's popularity (0 for specials that are never a target)."""
        self.trans_next.copy_(torch.as_tensor(nxt))
        self.trans_count.copy_(torch.as_tensor(count))
        self.trans_logpop.copy_(torch.as_tensor(p_pop).clamp(min=1e-12).log())

    def transition_terms(self, idx, at=None, targets=None, keep=None):
        """The transition term, a learned first-order Markov chain added to the logits: each page b
        that followed the scored position's token a in the training data, c(a, b) times, gets
        trans_w[0] * log(1 + c / (beta p_pop(b))) + trans_w[2 + bucket of c], beta = exp(trans_w[1]).
        With weight 1 and logits log p_pop elsewhere that is the Markov baseline's own ranking
        ((c + beta p_pop) / (c(a) + beta), up to a constant per row); a page has ~10 training events
        in a big shop's catalogue, too few for its embedding to learn whom it follows, and the
        table holds them all. targets (B, T): training targets, which the table counts: each one's
        own event is left out (leave-one-out), else the model learns to trust counts of 1 that
        unseen data never has. idx, at, keep as repeat_terms. Returns (pages, values), both (B, n,
        width) ((N, width) with keep), or None."""
        if self.trans_w is None:
            return None
        if keep is not None:                                                       # (N,) the kept positions
            a, targets = idx[keep], None if targets is None else targets[keep]
        else:
            a = idx if at is None else idx.gather(1, at)                           # (B, n) the last tokens
        pages = self.trans_next[a].long()                                          # (B, n, S) or (N, S)
        c = self.trans_count[a]
        if targets is not None:
            c = c - (pages == targets[..., None]).float()
        w, seen, c1 = self.trans_w, c > 0, c.clamp(min=1.0)         # c1: finite logs at the unseen entries
        lift = F.softplus(c1.log() - w[1] - self.trans_logpop[pages])    # log(1 + c / (beta p))
        bucket = age_bucket(c1.long())
        vals = w[0] * lift + w[2:].index_select(0, bucket.reshape(-1)).view(bucket.shape)   # in order: repeat_terms
        return torch.where(seen, pages, 0), torch.where(seen, vals, 0.0)

    def sparse_terms(self, idx, at=None, targets=None, keep=None, stats=None):
        """The repeat and transition terms together, (pages, values) (B, n, *), or (N, *) with keep:
        add with logits.scatter_add(-1, pages, values) (a page may appear in both). None if neither.
        stats: the repeat term's repeat_stats(idx), where the caller keeps them (sessions.KVCache)."""
        terms = [t for t in (self.repeat_terms(idx, at, keep, stats), self.transition_terms(idx, at, targets, keep))
                 if t is not None]
        if len(terms) < 2:
            return terms[0] if terms else None
        return torch.cat([terms[0][0], terms[1][0]], -1), torch.cat([terms[0][1], terms[1][1]], -1)

    def add_sparse(self, z, idx, at):
        """z (B, n, V) logits at positions at (B, n) of idx (B, T) -> z with the sparse terms added."""
        rep = self.sparse_terms(idx, at)
        return z if rep is None else z.scatter_add(-1, rep[0], rep[1].to(z.dtype))

    @torch.no_grad()
    def next_logits(self, idx, at, cluster_ids=None, rows=None, last=False):
        """Scores of the next page, the one "contexts -> logits" of every reader (evaluation, the
        session task, sample.py, predict.py, HeTLM's set choice; generation adds a cache: KVCache): idx (B, T) contexts right-padded
        with PAD (causal attention: a real position never sees the pads), at (B, n) the positions
        whose next token is scored. Returns float logits (B, n, V), the repeat and transition terms included, with
        dropout off. rows: contexts per pass of the trunk (bounds the (rows, T, 4C) activations);
        the head then runs once on all the gathered positions. last: at is every row's last
        position (generation over full windows, sessions.KVCache): the last block computes that
        position only, the same scores to rounding."""
        was_training = self.training
        if was_training:      # switching walks every module: not at each of generation's steps
            self.eval()
        B = idx.size(0)
        rows = rows or B
        if cluster_ids is not None:
            cluster_ids = torch.as_tensor(cluster_ids, dtype=torch.long, device=idx.device)
        h_at, reps = [], []
        for s in range(0, B, rows):
            cid = None if cluster_ids is None else cluster_ids[s:s + rows]
            h = self.hidden_states(idx[s:s + rows], cid, last)                        # (rows, T or 1, C)
            h_at.append(h if last else h[torch.arange(h.size(0), device=h.device)[:, None], at[s:s + rows]])
            reps.append(self.sparse_terms(idx[s:s + rows], at[s:s + rows]))          # (rows, n, *) or None
        z = self.head(torch.cat(h_at), cluster_ids).float()                          # (B, n, V)
        if reps[0] is not None:                                                      # the pages already seen or likely next
            z.scatter_add_(-1, torch.cat([p for p, _ in reps]), torch.cat([v for _, v in reps]).float())
        if was_training:
            self.train()
        return z

    def forward(self, idx, targets=None, cluster_ids=None, class_weight=None, logit_bias=None,
                return_logits=True, negatives=None):
        """class_weight (V,): loss weight of each target class (BehaviorLM's anchor/tail weighting,
        class-balanced loss); the loss is the weighted mean, as F.cross_entropy(weight=...).
        logit_bias (V,): added to the logits inside the loss only (training on a re-sampled subset
        while keeping the data's prior, as the balanced softmax of Ren et al., 2020).
        return_logits=False (training): the loss is computed in row chunks (ChunkedCrossEntropy)
        and the (N, V) logits are never materialized; logits is then None, and self.last_nll
        holds the batch's plain (unweighted) NLL, for logging beside a weighted loss.
        negatives (training, big catalogues): (pages (m,), offsets (m,)) from draw_negatives, a sampled
        softmax instead of the full one (_sampled_loss); last_nll is then the sampled loss."""
        h = self.hidden_states(idx, cluster_ids)           # (B, T, C)
        if targets is None:
            return self.add_sparse(self.head(h, cluster_ids), idx, None), None   # (B, T, V)
        keep = targets != -1                                # (B, T) real targets only
        rows = keep.nonzero(as_tuple=True)[0]
        cid = None if cluster_ids is None else cluster_ids[rows]
        t = targets[keep]
        rep = self.sparse_terms(idx, None, targets, keep)                           # (N, *)
        if not return_logits and negatives is not None:
            return None, self._sampled_loss(h[keep], t, cid, class_weight, logit_bias, rep, *negatives)
        if not return_logits:
            return None, self._chunked_loss(h[keep], t, cid, class_weight, logit_bias, rep)
        logits = self.head(h[keep], cid)                    # (N, V): no logits at pads
        if rep is not None:
            logits = logits.scatter_add(1, rep[0], rep[1].to(logits.dtype))
        z = logits.float() if logit_bias is None else logits.float() + logit_bias
        if t.numel() == 0 or (class_weight is not None and not class_weight[t].any()):
            loss = z.sum() * 0.0                           # nothing to learn here: 0, not NaN
        else:
            loss = F.cross_entropy(z, t, weight=class_weight)
        return logits, loss

    def _chunked_loss(self, h, t, cid, class_weight, logit_bias, rep=None):
        """The same weighted mean cross-entropy as forward's, in bounded memory: one pass with a
        shared head, else (scope 'all') one set's head per group of rows."""
        w = torch.ones_like(t, dtype=torch.float32) if class_weight is None else class_weight[t].float()
        denom = w.sum()
        if t.numel() == 0 or not denom > 0:
            return h.sum() * 0.0 + self.lm_head.weight.sum() * 0.0   # nothing to learn here: 0, not NaN
        grad = torch.is_grad_enabled()
        if self.lm_head.weight.dim() == 2:   # one head for every row (K = 1, 'blocks', 'norms'): one pass
            bias, rows = logit_bias, None
            if self.page_bias is not None:                          # each row adds its cluster's bias
                bias = self.page_bias if logit_bias is None else self.page_bias + logit_bias
                rows = torch.as_tensor(cid, dtype=torch.long, device=h.device)
            total, losses = ChunkedCrossEntropy.apply(h, self.lm_head.weight, t, w, bias, grad, rows, *(rep or (None, None)))
            self.last_nll = losses.mean()
            return total / denom
        total, nll = 0.0, 0.0
        for rows, k in self._groups(cid, h.size(0)):                # 'all': each set's own head
            hk, tk, wk = (h, t, w) if rows is None else (h[rows], t[rows], w[rows])
            rk = rep if rep is None or rows is None else (rep[0][rows], rep[1][rows])
            part, losses = ChunkedCrossEntropy.apply(hk, self.lm_head.weight[k], tk, wk, logit_bias, grad, None,
                                                     *(rk or (None, None)))
            total, nll = total + part, nll + losses.sum()
        self.last_nll = nll / t.numel()
        return total / denom

    def _sampled_loss(self, h, t, cid, class_weight, logit_bias, rep, pages, offsets):
        """A sampled softmax (Bengio & Senecal, 2008; Jean et al., 2015; SASRec with shared negatives:
        Klenitskiy & Vasilev, 2023): each row's target against the same pages drawn for the whole
        batch (draw_negatives; a draw equal to the row's target is left out), the sum of exp over
        the other pages estimated by importance weights (offsets: log(times drawn / expected
        draws)). Its cost grows with the sample, not the catalogue; evaluation still ranks every
        page. pages, offsets (m,): padding columns have offset -inf. The same weighted mean as
        _chunked_loss; with every page once and offsets 0 it is the full softmax."""
        w = torch.ones_like(t, dtype=torch.float32) if class_weight is None else class_weight[t].float()
        denom = w.sum()
        if t.numel() == 0 or not denom > 0:
            return h.sum() * 0.0 + self.lm_head.weight.sum() * 0.0   # nothing to learn here: 0, not NaN
        col = torch.full((self.config.vocab_size,), -1, dtype=torch.long, device=h.device)
        col[pages] = torch.arange(len(pages), device=h.device)     # page -> its column among the sample
        bias = offsets if logit_bias is None else offsets + logit_bias[pages]      # (m,) no gradient
        split = [(None, None)] if self.lm_head.weight.dim() == 2 else self._groups(cid, h.size(0))
        total, nll = 0.0, 0.0
        for rows, k in split:                                       # scope 'all': each set's own head
            hk, tk, wk = (h, t, w) if rows is None else (h[rows], t[rows], w[rows])
            W = self.lm_head.weight if k is None else self.lm_head.weight[k]
            # the targets' own scores (index_select: gradients added in order, as repeat_terms)
            zt = (hk * W.index_select(0, tk).to(hk.dtype)).sum(-1).float()             # (n,)
            if logit_bias is not None:
                zt = zt + logit_bias[tk]
            bk, brows = bias, None
            if self.page_bias is not None:                          # 'norms': each row's cluster bias
                brows = torch.as_tensor(cid, dtype=torch.long, device=h.device)
                zt = zt + self.page_bias[brows, tk]
                bk = self.page_bias.index_select(1, pages) + bias                     # (K, m)
            rp = rv = None
            if rep is not None:                                     # the sparse terms at the sampled pages
                rp, rv = (rep[0], rep[1].float()) if rows is None else (rep[0][rows], rep[1][rows].float())
                zt = zt + torch.where(rp == tk[:, None], rv, 0.0).sum(1)
                c = col[rp]
                rp, rv = c.clamp(min=0), torch.where(c >= 0, rv, 0.0)
            # the drawn pages as a small vocabulary, the target's drawn column (if any) left out
            part, losses = ChunkedCrossEntropy.apply(hk, W.index_select(0, pages), col[tk], wk, bk,
                                                     torch.is_grad_enabled(), brows, rp, rv, zt)
            total, nll = total + part, nll + losses.sum()
        self.last_nll = nll / t.numel()
        return total / denom

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        """AdamW; decay the matmul and embedding weights, not biases, LayerNorm gains or the
        per-cluster page bias (nanoGPT's rule "decay every >= 2-D tensor", by module, so that
        stacked per-cluster gains (K, C) are not decayed)."""
        mats = {id(m.weight) for m in self.modules() if isinstance(m, (SetLinear, SetEmbedding))}
        params = [p for p in self.parameters() if p.requires_grad]
        terms = [p for p in (self.repeat_w, self.repeat_d, self.trans_w) if p is not None]
        fast = {id(p) for p in terms}
        decay = [p for p in params if id(p) in mats]
        no_decay = [p for p in params if id(p) not in mats and id(p) not in fast]
        groups = [{'params': decay, 'weight_decay': weight_decay},
                  {'params': no_decay, 'weight_decay': 0.0}]
        if fast:   # train.py sets each group's lr to the schedule's times its lr_scale
            groups.append({'params': terms,
                           'weight_decay': 0.0, 'lr_scale': REPEAT_LR_SCALE})
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


MAX_PARAMS = 2 ** 31   # a model above this is refused before anything is allocated (a bad config or checkpoint)


def sampling_weights(p, power=0.75):
    """A sampled softmax's draw distribution (V,) from the training targets' frequencies p (V,, numpy):
    p^power, normalized (flatter than p, as word2vec's negatives); <unk> as likely as the rarest
    token (a target where --min_count > 1 leaves pages out of the vocabulary)."""
    q = p.copy()
    q[UNK] = q[q > 0].min()
    q = q ** power
    return torch.from_numpy(q / q.sum()).float()


def draw_negatives(q, m, generator=None):
    """A sampled softmax's pages for one step: m draws from q (V,) with replacement, each page once,
    with its importance weight as a log, log(times drawn) - log(m * q[page]) (so that the sum over
    columns of exp(offset) * x[page] estimates the sum of x over every page), padded to m columns
    of offset -inf (one shape every step: oneDNN builds a kernel per shape). Returns (pages, offsets)."""
    pages, counts = torch.unique(torch.multinomial(q, m, replacement=True, generator=generator), return_counts=True)
    offsets = counts.float().log() - torch.log(m * q[pages])
    pad = m - len(pages)
    return (torch.cat([pages, pages.new_full((pad,), PAD)]),
            torch.cat([offsets, offsets.new_full((pad,), -math.inf)]))


def check_gpt_config(config):
    """One-line ConfigError for a GPTConfig that cannot build a model: wrong types, sizes < 1,
    n_embd not a multiple of n_head, an unknown scope, or over MAX_PARAMS parameters (estimated
    from the sizes, so absurd values are refused before any allocation)."""
    c = config
    for f in fields(GPTConfig):
        v = getattr(c, f.name)
        kind = {int: numbers.Integral, float: numbers.Real}.get(f.type, f.type)
        if not isinstance(v, kind) or (f.type is not bool and isinstance(v, bool)):
            raise ConfigError(f"{f.name}={v!r}: should be a {f.type.__name__}")
    for name in ('block_size', 'vocab_size', 'n_layer', 'n_head', 'n_embd', 'n_clusters'):
        if getattr(c, name) < 1:
            raise ConfigError(f"{name}={getattr(c, name)}: must be >= 1")
    if c.cluster_scope not in SCOPES:
        raise ConfigError(f"n_clusters={c.n_clusters}, cluster_scope={c.cluster_scope!r}: "
                          f"need n_clusters >= 1 and a scope in {SCOPES}")
    if c.n_embd % c.n_head:
        raise ConfigError(f"n_embd={c.n_embd} is not a multiple of n_head={c.n_head}")
    if c.repeat_decay and not c.repeat_bias:
        raise ConfigError("repeat_decay=True needs repeat_bias=True (it is a part of the repeat term)")
    if not 0 <= c.transitions <= MAX_TRANSITIONS:
        raise ConfigError(f"transitions={c.transitions}: must be in [0, {MAX_TRANSITIONS}]")
    if not 0 <= c.dropout < 1:
        raise ConfigError(f"dropout={c.dropout}: must be in [0, 1)")
    # an upper bound (every weight per cluster), in Python ints: embeddings + head bias + blocks
    C, K = c.n_embd, c.n_clusters
    n = K * ((c.vocab_size + c.block_size) * C + c.vocab_size + c.n_layer * (12 * C * C + 13 * C) + 2 * C)
    if n > MAX_PARAMS:
        raise ConfigError(f"block_size={c.block_size} vocab_size={c.vocab_size} n_layer={c.n_layer} n_embd={C} "
                          f"n_clusters={K}: up to {n:.3g} parameters, over the limit of {MAX_PARAMS:.3g}")
