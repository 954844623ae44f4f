"""recipe.py: settings derived from the data's statistics; explicit settings win."""
import train
from recipe import AUTO, SAMPLED_MIN_PAGES, SAMPLED_PAGES, derive, describe


def stats(**kw):
    s = dict(users=5000, eval_users=4900, pages=400, train_tokens=175_000, train_events=150_000,
             len_p50=31.0, len_p90=63.0, session_len=7.7, repeat_rate=0.4)
    s.update(kw)
    return s


def test_every_auto_setting_is_derived_with_a_reason():
    cfg, reasons = derive(dict(train.DEFAULTS), stats())
    assert {k for k, _, _ in reasons} == set(AUTO)
    assert all(cfg[k] != AUTO[k] for k in AUTO) and all(why for _, _, why in reasons)
    assert cfg['n_embd'] % cfg['n_head'] == 0 and cfg['min_lr'] < cfg['learning_rate']
    assert 0 <= cfg['warmup_iters'] < cfg['max_iters'] and cfg['eval_interval'] <= cfg['max_iters']
    text = describe(reasons, stats())
    assert all(k in text for k in AUTO) and '5,000 users' in text


def test_longer_histories_get_a_longer_context():
    short, _ = derive(dict(train.DEFAULTS), stats(len_p90=12.0))
    mid, _ = derive(dict(train.DEFAULTS), stats(len_p90=63.0))
    long, _ = derive(dict(train.DEFAULTS), stats(len_p90=900.0))
    assert short['block_size'] < mid['block_size'] < long['block_size']
    assert long['batch_tokens'] >= 16 * long['block_size']     # still 16 rows per micro-batch


def test_more_data_more_iterations_and_a_big_catalogue_with_data_a_wider_model():
    small, _ = derive(dict(train.DEFAULTS), stats())
    big, _ = derive(dict(train.DEFAULTS), stats(train_tokens=20_000_000))
    assert big['max_iters'] > small['max_iters']
    shop, _ = derive(dict(train.DEFAULTS), stats(pages=3600, train_events=400_000))       # 111 events a page
    sparse, _ = derive(dict(train.DEFAULTS), stats(pages=20_000, train_events=300_000))   # 15 events a page
    assert shop['n_embd'] > small['n_embd'] == sparse['n_embd']
    assert shop['n_embd'] % shop['n_head'] == 0 and shop['learning_rate'] < small['learning_rate']
    # the transition term where pages have too few events to learn whom they follow, and only there
    assert sparse['transitions'] == 32 and shop['transitions'] == small['transitions'] == 0
    off, reasons = derive(dict(train.DEFAULTS, transitions=0), stats(pages=20_000, train_events=300_000))
    assert off['transitions'] == 0 and 'transitions' not in {k for k, _, _ in reasons}
    # a sampled softmax from SAMPLED_MIN_PAGES pages on, the full softmax below
    assert sparse['sampled_softmax'] == SAMPLED_PAGES and shop['sampled_softmax'] == small['sampled_softmax'] == 0
    edge, _ = derive(dict(train.DEFAULTS), stats(pages=SAMPLED_MIN_PAGES - 1, train_events=300_000))
    full, reasons = derive(dict(train.DEFAULTS, sampled_softmax=0), stats(pages=20_000, train_events=300_000))
    assert edge['sampled_softmax'] == full['sampled_softmax'] == 0 and 'sampled_softmax' not in {k for k, _, _ in reasons}


def test_explicit_settings_win():
    given = dict(train.DEFAULTS, block_size=100, dropout=0.0, max_iters=7, learning_rate=1e-4)
    cfg, reasons = derive(given, stats(len_p90=900.0))
    assert (cfg['block_size'], cfg['dropout'], cfg['max_iters'], cfg['learning_rate']) == (100, 0.0, 7, 1e-4)
    assert not {'block_size', 'dropout', 'max_iters', 'learning_rate'} & {k for k, _, _ in reasons}
    assert cfg['min_lr'] == 1e-5 and cfg['eval_interval'] >= 1   # rules that depend on them follow them


def test_a_negative_setting_other_than_from_the_data_is_a_one_line_error():
    import pytest
    from configurator import ConfigError
    from recipe import check_config
    check_config(dict(train.DEFAULTS))                  # -1: from the data
    for k in ('sampled_softmax', 'transitions'):
        with pytest.raises(ConfigError, match=f"--{k}=-2: must be >= 0"):
            check_config(dict(train.DEFAULTS, **{k: -2}))


def test_a_run_from_before_the_sampled_softmax_continues_with_the_full_one():
    from recipe import fill_settings
    done, _ = derive(dict(train.DEFAULTS), stats(pages=20_000, train_events=300_000))
    old = {k: done[k] for k in AUTO if k != 'sampled_softmax'}      # a checkpoint's config without the key
    cfg, reasons, read = fill_settings(dict(train.DEFAULTS), None, {'config': old, 'derived': []}, False)
    assert cfg['sampled_softmax'] == 0 and read is None and done['sampled_softmax'] == SAMPLED_PAGES
