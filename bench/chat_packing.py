"""Conversations (issue 27 foundation): how fast ``ddk.data.chat`` tokenises and masks, and packing against padding.

The chat kit's generated rows (``ddk.kit.chat.generate_domain``, seed 0, ``N`` per domain, four domains), rendered
with the kit's ChatML template and character-level tokenizer; then the same conversations (a) packed by
``ddk.data.packing.pack`` into ``seq_len`` blocks, (b) padded, one conversation per block of ``seq_len``, and
(c) padded to the longest of each batch of 16. Prints the
conversations per second of ``prepare_conversations`` (two renders and two tokenisations per assistant turn, plus
the whole conversation), the blocks and the share of positions that hold tokens for both layouts, and the load
average before and after. Never asserts on time.

    .venv/bin/python bench/chat_packing.py [N] [SEQ_LEN]
"""

from __future__ import annotations

import os
import sys
import time


def main() -> None:
    from ddk.data.chat import Conversation, prepare_conversations
    from ddk.data.packing import pack, packing_efficiency
    from ddk.kit.chat import CHAT_DOMAINS, chat_tokenizer, generate_domain

    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    seq_len = int(sys.argv[2]) if len(sys.argv) > 2 else 128
    print(f"load average before: {os.getloadavg()}")
    tok = chat_tokenizer(2 * seq_len)
    convs = [Conversation(tuple(r["messages"]), (1,)) for d in CHAT_DOMAINS for r in generate_domain(d, n, 0, 0)[0]]
    t0 = time.perf_counter()
    prep = prepare_conversations(tok, convs, seq_len, "drop")
    took = time.perf_counter() - t0
    print(f"prepare_conversations: {len(convs)} conversations in {took:.2f} s = {len(convs) / took:.0f} conv/s; "
          f"tokens {prep.stats.tokens}, label tokens {prep.stats.label_tokens}, "
          f"mean length {prep.stats.tokens / max(1, prep.stats.kept):.1f}")
    items = [(t.input_ids, t.assistant_mask) for t in prep.items]
    t0 = time.perf_counter()
    packed = pack(items, seq_len)
    took = time.perf_counter() - t0
    padded_blocks = len(items)  # one conversation per block
    padded_eff = prep.stats.tokens / (padded_blocks * seq_len)
    print(f"seq_len {seq_len}: packed {len(packed)} blocks, {packing_efficiency(packed):.3f} of positions hold tokens "
          f"(pack took {took:.2f} s); padded {padded_blocks} blocks, {padded_eff:.3f}; "
          f"packed/padded blocks = {len(packed) / padded_blocks:.3f}")
    import random

    order = list(range(len(items)))
    random.Random(0).shuffle(order)
    lens = [len(items[i][0]) for i in order]
    dyn = sum(16 * max(lens[i:i + 16]) for i in range(0, len(lens), 16))
    print(f"padded to the longest of each batch of 16 (shuffled, seed 0): {prep.stats.tokens / dyn:.3f} of positions "
          f"hold tokens")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
