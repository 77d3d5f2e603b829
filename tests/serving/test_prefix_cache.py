"""The prefix cache's bookkeeping: block-aligned hits, exact token matches, LRU eviction."""

import torch

from serving.prefix_cache import PrefixCache


def layers_for(tokens: list[int], n_layers: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Keys/values whose every position holds its token id, so a hit's contents can be checked."""
    column = torch.tensor(tokens, dtype=torch.float32).view(1, 1, -1, 1)
    return [(column.clone(), -column.clone()) for _ in range(n_layers)]


def test_a_hit_is_the_longest_full_block_prefix_that_leaves_a_token_to_prefill():
    cache = PrefixCache(max_entries=4, block_tokens=4)
    first = list(range(10))  # blocks 0-3, 4-7 stored; 8, 9 are not a full block
    assert cache.lookup(first) is None
    cache.store(first, layers_for(first))
    length, layers = cache.lookup(list(range(8)) + [99, 98])
    assert length == 8 and layers[0][0].flatten().tolist() == list(range(8))
    assert layers[1][1].flatten().tolist() == [-t for t in range(8)]
    # the whole prompt cached: one token must still run, so the hit stops a block earlier
    assert cache.lookup(list(range(8)))[0] == 4
    assert cache.lookup([0, 1, 2, 7, 4, 5, 6, 7, 8]) is None  # differs inside the first block
    assert cache.lookup([0, 1, 2, 3, 9, 9, 9, 9, 9])[0] == 4  # shares one block


def test_least_recently_used_entries_go_and_a_disabled_cache_holds_nothing():
    cache = PrefixCache(max_entries=2, block_tokens=2)
    a, b, c = [1, 2, 3, 4, 5], [7, 8, 9, 9, 9], [5, 5, 5, 5, 5]
    for tokens in (a, b):
        cache.store(tokens, layers_for(tokens))
    assert cache.lookup(a + [0])[0] == 4  # a is now the most recently used
    cache.store(c, layers_for(c))
    assert len(cache) == 2 and cache.lookup(b + [0]) is None and cache.lookup(a + [0])[0] == 4
    off = PrefixCache(max_entries=0)
    off.store(a * 10, layers_for(a * 10))
    assert len(off) == 0 and off.lookup(a * 10) is None


def test_an_entry_that_a_newer_one_extends_goes_and_its_blocks_still_hit():
    """A long prompt's chunks (or a conversation's turns) store prefixes of one another: the newer,
    longer entry answers every block of the older one, which would only hold a second copy."""
    cache = PrefixCache(max_entries=4, block_tokens=4)
    turn1, turn2 = list(range(9)), list(range(17))
    cache.store(turn1, layers_for(turn1))
    cache.store(turn2, layers_for(turn2))
    assert len(cache) == 1
    assert cache.lookup(turn1)[0] == 8 and cache.lookup(turn2)[0] == 16
    assert cache.cached_tokens(turn2) == 16 and cache.cached_tokens([5, 5, 5, 5, 5]) == 0
    other = [0, 1, 2, 3, 9, 9, 9, 9, 9]  # shares one block but is no prefix: both kept
    cache.store(other, layers_for(other))
    assert len(cache) == 2 and cache.lookup(turn2)[0] == 16 and cache.lookup(other + [1])[0] == 8
