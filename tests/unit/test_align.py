"""Cross-tokenizer alignment (ddk.trainer.align) and loss (ddk.trainer.xtok_loss), issue 29's foundation.

Two tokenizers are built here by hand, with `tokenizers`, so every expected span and group below is worked out
from their few merges and the text's UTF-8 bytes (not from the code under test):

- S, "student": GPT-2-style byte-level BPE, the 256 byte characters plus the merges
  n+a, Ã+¯ (ï), na+Ã¯, v+e, Ġ+c, a+f, Ã+© (é), af+Ã©, Ġ+Ġ.
- T, "teacher": SentencePiece-style BPE (' ' -> '▁', byte fallback <0xNN>), the characters ▁ n a ï v e c f é x y b
  plus the merges ▁+c, a+f, ▁c+af, ï+v, ïv+e, ▁+▁.

"naïve café ☕" is 16 bytes: n(0) a(1) ï(2,3) v(4) e(5) ' '(6) c(7) a(8) f(9) é(10,11) ' '(12) ☕(13,14,15).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from ddk.trainer.align import (align_groups, bits_per_byte, byte_level_table, byte_spans, char_to_byte_offsets,
                               check_tiling, compared_positions, log_ratio_per_byte, log_ratio_per_student_token,
                               piece_bytes, piece_scheme, shared_vocab, spans_from_ids, spans_from_pieces,
                               vocab_byte_lengths)
from ddk.trainer.loss import LOSSES, distill_loss
from ddk.trainer.xtok_loss import (gold_weights, identity_positions, uld_sorted_l1, xtok_distill_loss,
                                   xtok_terms, divergence_fn)

TEXT = "naïve café ☕"
SPECIAL = ["<s>", "</s>"]


def _student_tokenizer() -> Tokenizer:
    # GPT-2's printable stand-ins for the bytes, written out here (not taken from align.py): bytes '!'..'~',
    # 0xA1..0xAC and 0xAE..0xFF stand for themselves, the 68 others get U+0100, U+0101, ... in byte order
    keep = set(range(0x21, 0x7F)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(0x100 + extra)
            extra += 1
    vocab = {"<s>": 0, "</s>": 1}
    for b in range(256):
        vocab[chars[b]] = b + 2
    merges = [("n", "a"), ("Ã", "¯"), ("na", "Ã¯"), ("v", "e"), ("Ġ", "c"), ("a", "f"), ("Ã", "©"),
              ("af", "Ã©"), ("Ġ", "Ġ")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL)
    return tok


def _teacher_tokenizer() -> Tokenizer:
    vocab = {"<s>": 0, "</s>": 1}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = b + 2
    for ch in "▁naïvecféxyb":
        vocab.setdefault(ch, len(vocab))
    merges = [("▁", "c"), ("a", "f"), ("▁c", "af"), ("ï", "v"), ("ïv", "e"), ("▁", "▁")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens(SPECIAL)
    return tok


@pytest.fixture(scope="module")
def pair():
    return _student_tokenizer(), _teacher_tokenizer()


def _scheme(tok: Tokenizer) -> str:
    return piece_scheme(json.loads(tok.to_str())["decoder"])


def _spans(tok: Tokenizer, text: str, with_pieces: bool = True, add_special_tokens: bool = False) -> list:
    enc = tok.encode(text, add_special_tokens=add_special_tokens)
    if with_pieces:
        return byte_spans(text, enc.offsets, enc.tokens, _scheme(tok), enc.special_tokens_mask).tolist()
    return byte_spans(text, enc.offsets, special=enc.special_tokens_mask).tolist()


# ---------------------------------------------------------------------------------------------------------
# pieces, schemes, char -> byte offsets

def test_piece_bytes_by_hand_and_against_the_tokenizers_own_pieces(pair):
    S, T = pair
    assert piece_bytes("Ġcat", "byte_level") == b" cat"
    assert piece_bytes("Ċ", "byte_level") == b"\n"
    assert piece_bytes("Ã©", "byte_level") == "é".encode()
    # '<', 's', '>' are printable bytes standing for themselves: a special token's piece decodes as its literal
    # text, which is why specials are named apart (the special mask, the special lists), never decoded
    assert piece_bytes("<s>", "byte_level") == b"<s>"
    assert piece_bytes("日", "byte_level") is None  # not one of the 256 byte characters
    assert piece_bytes("▁caf", "sentencepiece") == b" caf"
    assert piece_bytes("<0xE2>", "sentencepiece") == b"\xe2"
    assert piece_bytes("é", "plain") == b"\xc3\xa9"
    # the table agrees with the byte-level tokenizer: its pieces of any text concatenate back to the text
    for text in (TEXT, "a   b", "  x\n\n y", "日本語 テキスト\t!"):
        enc = S.encode(text, add_special_tokens=False)
        assert b"".join(piece_bytes(p, "byte_level") for p in enc.tokens) == text.encode()
    assert len(set(byte_level_table().values())) == 256


def test_piece_scheme_from_the_decoder(pair):
    S, T = pair
    assert _scheme(S) == "byte_level"
    assert _scheme(T) == "sentencepiece"
    assert piece_scheme(None) == "plain"
    assert piece_scheme({"type": "Metaspace", "replacement": "▁"}) == "sentencepiece"
    with pytest.raises(ValueError, match="WordPiece"):
        piece_scheme({"type": "WordPiece", "prefix": "##"})


def test_char_to_byte_offsets_multibyte():
    # chars: n0 a1 ï2 v3 e4 ' '5 c6 a7 f8 é9 ' '10 ☕11 -> bytes 0 1 2-3 4 5 6 7 8 9 10-11 12 13-15
    got = char_to_byte_offsets(TEXT, [(0, 2), (2, 3), (3, 5), (9, 10), (10, 11), (11, 12), (12, 12)]).tolist()
    assert got == [[0, 2], [2, 4], [4, 6], [10, 12], [12, 13], [13, 16], [16, 16]]
    with pytest.raises(ValueError):
        char_to_byte_offsets(TEXT, [(0, 13)])


# ---------------------------------------------------------------------------------------------------------
# byte spans and aligned groups, by hand

def test_spans_and_groups_naive_cafe_cup(pair):
    S, T = pair
    # S: naÃ¯ | ve | Ġc | afÃ© | Ġ | â | ĺ | ķ      (☕ = E2 98 95: three byte tokens)
    assert S.encode(TEXT, add_special_tokens=False).tokens == ["naÃ¯", "ve", "Ġc", "afÃ©", "Ġ", "â", "ĺ", "ķ"]
    s_spans = [[0, 4], [4, 6], [6, 8], [8, 12], [12, 13], [13, 14], [14, 15], [15, 16]]
    assert _spans(S, TEXT) == s_spans
    # T: n | a | ïve | ▁caf | é | ▁ | <0xE2> | <0x98> | <0x95>
    assert T.encode(TEXT, add_special_tokens=False).tokens == ["n", "a", "ïve", "▁caf", "é", "▁", "<0xE2>",
                                                               "<0x98>", "<0x95>"]
    t_spans = [[0, 1], [1, 2], [2, 6], [6, 10], [10, 12], [12, 13], [13, 14], [14, 15], [15, 16]]
    assert _spans(T, TEXT) == t_spans
    # boundaries S: 4 6 8 12 13 14 15 16; T: 1 2 6 10 12 13 14 15 16; common: 6 12 13 14 15 16
    groups = align_groups(np.array(s_spans), np.array(t_spans))
    assert groups.as_tuples() == [((0, 2), (0, 3), (0, 6)),      # "naïve"
                                  ((2, 4), (3, 5), (6, 12)),     # " café"
                                  ((4, 5), (5, 6), (12, 13)),    # " "
                                  ((5, 6), (6, 7), (13, 14)),    # ☕'s three bytes, one by one
                                  ((6, 7), (7, 8), (14, 15)),
                                  ((7, 8), (8, 9), (15, 16))]
    # compared: every group but the last (the next token lies beyond the text); the last tokens of each side
    g, s_pos, t_pos = compared_positions(groups)
    assert g.tolist() == [0, 1, 2, 3, 4]
    assert s_pos.tolist() == [1, 3, 4, 5, 6] and t_pos.tolist() == [2, 4, 5, 6, 7]
    # a teacher position without a top-k drops its group
    scored = np.ones(9, dtype=bool)
    scored[4] = False
    assert compared_positions(groups, teacher_scored=scored)[0].tolist() == [0, 2, 3, 4]


def test_offsets_alone_never_split_a_character(pair):
    S, T = pair
    # without the pieces, byte tokens of ☕ share its char offsets: the first two get empty spans, the last the
    # whole character, so ☕ is one group (coarser, never wrong)
    assert _spans(S, TEXT, with_pieces=False) == [[0, 4], [4, 6], [6, 8], [8, 12], [12, 13], [13, 13], [13, 13],
                                                  [13, 16]]
    assert _spans(T, TEXT, with_pieces=False) == [[0, 1], [1, 2], [2, 6], [6, 10], [10, 12], [12, 13], [13, 13],
                                                  [13, 13], [13, 16]]
    groups = align_groups(np.array(_spans(S, TEXT, False)), np.array(_spans(T, TEXT, False)))
    assert groups.as_tuples()[-1] == ((5, 8), (6, 9), (13, 16))
    assert len(groups) == 4


def test_whitespace_runs(pair):
    S, T = pair
    # "a   b": S (GPT-2 regex splits "a", "  ", " ", "b"): a | ĠĠ | Ġ | b ; T: a | ▁▁ | ▁ | b
    assert S.encode("a   b").tokens == ["a", "ĠĠ", "Ġ", "b"]
    assert T.encode("a   b").tokens == ["a", "▁▁", "▁", "b"]
    assert _spans(S, "a   b") == [[0, 1], [1, 3], [3, 4], [4, 5]]
    assert align_groups(np.array(_spans(S, "a   b")), np.array(_spans(T, "a   b"))).as_tuples() == [
        ((0, 1), (0, 1), (0, 1)), ((1, 2), (1, 2), (1, 3)), ((2, 3), (2, 3), (3, 4)), ((3, 4), (3, 4), (4, 5))]
    # "  x\n\n y": S: Ġ | Ġ | x | Ċ | Ċ | Ġ | y ; T: ▁▁ | x | <0x0A> | <0x0A> | ▁ | y
    text = "  x\n\n y"
    assert _spans(S, text) == [[0, 1], [1, 2], [2, 3], [3, 4], [4, 5], [5, 6], [6, 7]]
    assert _spans(T, text) == [[0, 2], [2, 3], [3, 4], [4, 5], [5, 6], [6, 7]]
    assert align_groups(np.array(_spans(S, text)), np.array(_spans(T, text))).as_tuples() == [
        ((0, 2), (0, 1), (0, 2)), ((2, 3), (1, 2), (2, 3)), ((3, 4), (2, 3), (3, 4)), ((4, 5), (3, 4), (4, 5)),
        ((5, 6), (4, 5), (5, 6)), ((6, 7), (5, 6), (6, 7))]


def test_trimmed_offsets_are_restored(pair):
    # a ByteLevel post-processor with trim_offsets leaves the leading space out of 'Ġc' and gives whitespace-only
    # tokens an empty span at the end of their whitespace; the pieces restore the exact spans, the offsets-alone
    # rule gives each gap to the token after it, which here is exact too
    S = _student_tokenizer()
    S.post_processor = processors.ByteLevel(trim_offsets=True)
    enc = S.encode("a   b")
    assert enc.offsets == [(0, 1), (3, 3), (4, 4), (4, 5)]  # the trimming this test is about
    assert _spans(S, "a   b") == [[0, 1], [1, 3], [3, 4], [4, 5]]
    assert _spans(S, "a   b", with_pieces=False) == [[0, 1], [1, 3], [3, 4], [4, 5]]
    assert _spans(S, TEXT) == [[0, 4], [4, 6], [6, 8], [8, 12], [12, 13], [13, 14], [14, 15], [15, 16]]


def test_special_tokens_have_empty_spans_and_join_the_next_group(pair):
    S, T = pair
    S.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 1)])
    try:
        enc = S.encode("a   b")
        assert enc.tokens == ["<s>", "a", "ĠĠ", "Ġ", "b", "</s>"]
        spans = _spans(S, "a   b", add_special_tokens=True)
        assert spans == [[0, 0], [0, 1], [1, 3], [3, 4], [4, 5], [5, 5]]
        groups = align_groups(np.array(spans), np.array(_spans(T, "a   b")))
        # <s> is in the first group; </s> (after the last boundary) is in none
        assert groups.as_tuples() == [((0, 2), (0, 1), (0, 1)), ((2, 3), (1, 2), (1, 3)), ((3, 4), (2, 3), (3, 4)),
                                      ((4, 5), (3, 4), (4, 5))]
    finally:
        S.post_processor = None


def test_spans_from_ids_of_the_student_tokens(pair):
    S, _ = pair
    table = vocab_byte_lengths(S.get_vocab(), "byte_level", SPECIAL)
    assert table[S.token_to_id("naÃ¯")] == 4 and table[S.token_to_id("<s>")] == 0 and (table >= 0).all()
    ids = [S.token_to_id("<s>")] + S.encode(TEXT, add_special_tokens=False).ids
    assert spans_from_ids(ids, table).tolist() == [[0, 0], [0, 4], [4, 6], [6, 8], [8, 12], [12, 13], [13, 14],
                                                   [14, 15], [15, 16]]
    with pytest.raises(ValueError, match="stands for no bytes"):
        spans_from_ids([1], np.array([0, -1]))


def test_spans_from_pieces_and_tiling_checks():
    assert spans_from_pieces(["naÃ¯", "ve", "<s>"], "byte_level", [0, 0, 1]).tolist() == [[0, 4], [4, 6], [6, 6]]
    check_tiling(np.array([[0, 2], [2, 2], [2, 5]]), 5)
    with pytest.raises(ValueError):
        check_tiling(np.array([[0, 2], [3, 5]]))
    with pytest.raises(ValueError):
        check_tiling(np.array([[0, 2], [2, 5]]), 6)
    with pytest.raises(ValueError, match="do not touch"):  # pieces of another text
        byte_spans("abcdef", [(0, 1), (1, 2), (2, 6)], ["abcd", "e", "f"], "byte_level")


def test_a_longer_teacher_text_aligns_up_to_the_last_common_boundary():
    # the teacher read "ab cd" (0-2, 2-5), the student only "ab c" (0-1, 1-2, 2-4): groups up to byte 2
    groups = align_groups(np.array([[0, 1], [1, 2], [2, 4]]), np.array([[0, 2], [2, 5]]))
    assert groups.as_tuples() == [((0, 2), (0, 1), (0, 2))]
    # no common boundary at all: no group, nothing compared
    none = align_groups(np.array([[0, 3]]), np.array([[0, 2], [2, 4]]))
    assert len(none) == 0 and none.as_tuples() == []
    assert compared_positions(none)[0].tolist() == []


def test_kit_tokenizer_groups_cover_the_same_bytes(kit, pair):
    """The quick kit's own byte-level tokenizer against T: every group's student and teacher pieces are the
    text's bytes of the group (an invariant any correct alignment keeps)."""
    K = Tokenizer.from_file(str(kit / "student" / "tokenizer.json"))
    _, T = pair
    for text in (TEXT, "a   b", "  x\n\n y", "The cat sat.\n\nNaïve, café: ☕☕ 日本"):
        k_enc, t_enc = K.encode(text, add_special_tokens=False), T.encode(text, add_special_tokens=False)
        ks, ts = np.array(_spans(K, text)), np.array(_spans(T, text))
        check_tiling(ks, len(text.encode()))
        check_tiling(ts, len(text.encode()))
        groups = align_groups(ks, ts)
        assert groups.byte_end[-1] == len(text.encode())
        for (s0, s1), (t0, t1), (b0, b1) in groups.as_tuples():
            raw = text.encode()[b0:b1]
            assert b"".join(piece_bytes(p, "byte_level") for p in k_enc.tokens[s0:s1]) == raw
            assert b"".join(piece_bytes(p, "sentencepiece") for p in t_enc.tokens[t0:t1]) == raw


# ---------------------------------------------------------------------------------------------------------
# the shared vocabulary

def test_shared_vocab_by_hand(pair):
    S, T = pair
    sv, tv = S.get_vocab(), T.get_vocab()
    shared = shared_vocab(sv, "byte_level", tv, "sentencepiece", SPECIAL, SPECIAL)
    pairs = dict(zip(shared.teacher_ids.tolist(), shared.student_ids.tolist()))
    assert pairs[tv["▁c"]] == sv["Ġc"]            # ' c'
    assert pairs[tv["▁"]] == sv["Ġ"]              # ' '
    assert pairs[tv["é"]] == sv["Ã©"]             # C3 A9
    assert pairs[tv["<0xC3>"]] == sv["Ã"]         # byte fallback meets a byte-level byte
    assert pairs[tv["n"]] == sv["n"] and tv["<0x6E>"] not in pairs  # 'n' and its fallback '<0x6E>': the piece
    assert pairs[tv["<s>"]] == sv["<s>"] and pairs[tv["</s>"]] == sv["</s>"]
    assert pairs[tv["ï"]] == sv["Ã¯"]             # C3 AF
    assert pairs[tv["▁▁"]] == sv["ĠĠ"] and pairs[tv["af"]] == sv["af"]
    for piece in ("▁caf", "ïv", "ïve"):           # ' caf', 'ïv', 'ïve' are not in S
        assert tv[piece] not in pairs
    for piece in ("naÃ¯", "na", "ve", "afÃ©"):     # 'naï', 'na', 've', 'afé' are not in T
        assert sv[piece] not in pairs.values()
    assert len(set(pairs.values())) == len(pairs)  # one-to-one
    # by count: the 256 single bytes (10 of them through T's plain pieces ▁ n a v e c f x y b, 246 through its
    # fallbacks), the 5 multi-byte strings in both (ï, é, ' c', 'af', '  '), the 2 specials
    assert len(pairs) == 256 + 5 + 2
    m = shared.teacher_to_student(len(tv))
    assert m[tv["▁caf"]] == -1 and m[tv["▁c"]] == sv["Ġc"]
    assert shared.student_mask(len(sv)).sum() == len(pairs)


# ---------------------------------------------------------------------------------------------------------
# the loss

def test_uld_term_by_hand():
    s = torch.tensor([[0.2, 0.05, 0.15]])
    t = torch.tensor([[0.1, 0.3]])
    # sorted: [0.2, 0.15, 0.05] vs [0.3, 0.1, 0] -> 0.1 + 0.05 + 0.05
    assert uld_sorted_l1(s, t).item() == pytest.approx(0.2, abs=1e-7)
    assert uld_sorted_l1(torch.tensor([[0.5, 0.2, 0.3]]), torch.tensor([[0.3, 0.5, 0.2, 0.0]])).item() == 0.0


def test_xtok_terms_by_hand():
    # student vocab 0..3, ids 0, 1 shared; teacher vocab 0..3: teacher 0 -> student 0, 1 -> 1, 2 and 3 unmapped
    q = torch.tensor([[0.4, 0.2, 0.3, 0.1]], dtype=torch.float64)
    t_ids = torch.tensor([[2, 0, 3]])
    t_p = torch.tensor([[0.5, 0.3, 0.1]])  # tail 0.1
    t2s = torch.tensor([0, 1, -1, -1])
    shared = torch.tensor([True, True, False, False])
    match, uld = xtok_terms(q.log().float(), t_ids, t_p.log(), t2s, shared, 1.0, divergence_fn("forward_kl"))
    # buckets: {student 0} and the rest; teacher [0.3, 0.7], student [0.4, 0.6]
    assert match.item() == pytest.approx(0.3 * math.log(0.3 / 0.4) + 0.7 * math.log(0.7 / 0.6), abs=1e-6)
    # teacher's unmapped sorted [0.5, 0.1, 0]; student's non-shared [0.3, 0.1] padded: 0.2 + 0 + 0
    assert uld.item() == pytest.approx(0.2, abs=1e-6)
    # the same distributions permuted among the non-shared ids: ULD 0
    _, uld0 = xtok_terms(torch.tensor([[0.4, 0.2, 0.1, 0.3]]).log(), torch.tensor([[2, 3]]),
                         torch.tensor([[0.1, 0.3]]).log(), t2s, shared, 1.0, divergence_fn("forward_kl"))
    assert uld0.item() == pytest.approx(0.0, abs=1e-7)
    assert gold_weights(2, 4) == (0.5, 0.5)
    # the whole loss: gamma 1, one position, GOLD's weights 0.5 / 0.5, no CE label
    logits = q.log().float().view(1, 1, 4).requires_grad_(True)
    total, parts = xtok_distill_loss(logits, torch.tensor([[-100]]), torch.tensor([0]), t_ids, t_p.log(), t2s,
                                     shared, gamma=1.0)
    assert parts["kl"].item() == pytest.approx(0.5 * match.item() + 0.5 * 0.2, abs=1e-6)
    assert total.item() == pytest.approx(parts["kl"].item(), abs=1e-6)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_identity_equals_todays_loss(pair, loss, temperature):
    """One tokenizer on both sides: aligned groups are single tokens, every id is shared, and the loss and its
    gradient are distill_loss's (to 1e-5)."""
    S, _ = pair
    vocab = S.get_vocab()
    V = len(vocab)
    shared = shared_vocab(vocab, "byte_level", vocab, "byte_level", SPECIAL, SPECIAL)
    assert shared.teacher_ids.tolist() == list(range(V)) == shared.student_ids.tolist()
    texts = [TEXT + " a   b", "  x\n\n y naïve"]
    encs = [S.encode(t, add_special_tokens=False) for t in texts]
    L = max(len(e.ids) for e in encs)
    labels = torch.full((2, L), -100)
    for b, (t, e) in enumerate(zip(texts, encs)):
        spans = np.array(_spans(S, t))
        groups = align_groups(spans, spans)
        assert (groups.student_end - groups.student_start == 1).all() and len(groups) == len(e.ids)
        labels[b, : len(e.ids) - 1] = torch.tensor(e.ids[1:])
        _, s_pos, t_pos = compared_positions(groups)
        assert s_pos.tolist() == t_pos.tolist() == list(range(len(e.ids) - 1))
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(2, L, V, generator=g) * 2
    t_logp = torch.log_softmax(torch.randn(2, L, V, generator=g) * 3, -1)
    k = 8
    t_lp, t_ids = t_logp.topk(k, dim=-1)
    pos = identity_positions(labels)
    assert pos.tolist() == [b * L + i for b in range(2) for i in range(L) if labels[b, i] != -100]

    a = logits.clone().requires_grad_(True)
    ref, ref_parts = distill_loss(a, labels, t_ids, t_lp, 0.7, temperature, loss)
    ref.backward()
    b_ = logits.clone().requires_grad_(True)
    got, parts = xtok_distill_loss(b_, labels, pos, t_ids.reshape(-1, k)[pos], t_lp.reshape(-1, k)[pos],
                                   torch.from_numpy(shared.teacher_to_student(V)),
                                   torch.from_numpy(shared.student_mask(V)), 0.7, temperature, loss)
    got.backward()
    assert parts["uld"].item() == 0.0
    assert got.item() == pytest.approx(ref.item(), abs=1e-5)
    assert parts["kl"].item() == pytest.approx(ref_parts["kl"].item(), abs=1e-5)
    torch.testing.assert_close(b_.grad, a.grad, atol=1e-5, rtol=0)


def test_identity_full_vocabulary():
    """k == V (no tail bucket): still today's loss."""
    V = 6
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(1, 4, V, generator=g)
    labels = torch.tensor([[1, 2, 3, -100]])
    t_lp, t_ids = torch.log_softmax(torch.randn(1, 4, V, generator=g), -1).topk(V, dim=-1)
    ref, _ = distill_loss(logits, labels, t_ids, t_lp, 1.0, 1.0, "jsd")
    pos = identity_positions(labels)
    got, _ = xtok_distill_loss(logits, labels, pos, t_ids.reshape(-1, V)[pos], t_lp.reshape(-1, V)[pos],
                               torch.arange(V), torch.ones(V, dtype=torch.bool), 1.0, 1.0, "jsd")
    assert got.item() == pytest.approx(ref.item(), abs=1e-5)


def test_unmapped_mass_is_in_the_tail_and_gradients_are_finite():
    # nothing mapped and a teacher with no tail: the common-support term is 0 (both all "rest"), ULD carries it
    logits = torch.randn(1, 2, 5, requires_grad=True)
    t_ids = torch.tensor([[3, 4]])
    t_lp = torch.tensor([[0.7, 0.3]]).log()
    t2s = torch.full((5,), -1)
    total, parts = xtok_distill_loss(logits, torch.tensor([[1, -100]]), torch.tensor([0]), t_ids, t_lp, t2s,
                                     torch.zeros(5, dtype=torch.bool), gamma=1.0)
    total.backward()
    assert torch.isfinite(logits.grad).all()
    assert parts["match"].item() == pytest.approx(0.0, abs=1e-6)
    assert parts["kl"].item() == pytest.approx(parts["uld"].item(), abs=1e-6)  # w_uld = 1 - 0/5
    assert parts["uld"].item() > 0


# ---------------------------------------------------------------------------------------------------------
# the fair gap: bits per byte

def test_bits_per_byte_by_hand():
    # 100 nats over 50 bytes: 2 nats/byte = 2 / ln 2 bits/byte
    assert bits_per_byte(100.0, 50) == pytest.approx(2.0 / math.log(2))
    assert log_ratio_per_byte(100.0, 60.0, 50) == pytest.approx(40.0 / 50)
    with pytest.raises(ValueError):
        bits_per_byte(1.0, 0)


def test_same_tokenizer_per_byte_gap_and_domain_ranking():
    """One tokenizer on both sides, domains (tokens, bytes, student and teacher mean NLL per token):
    the per-byte gap of a domain is its per-token gap times tokens/bytes (a monotone function of it within the
    domain), but the factor differs between domains, so the plain per-byte gap can reorder domains; rescaled to the
    student's tokens it is today's log-ratio exactly, so it ranks (and weighs) domains as today."""
    domains = {"code": (400, 1600, 2.5, 2.0),   # 0.25 tokens/byte, per-token gap 0.5
               "web": (500, 1000, 3.4, 3.0),    # 0.5 tokens/byte, per-token gap 0.4
               "math": (300, 900, 2.3, 2.2)}    # 1/3 tokens/byte, per-token gap 0.1
    per_token, per_byte, rescaled = {}, {}, {}
    for d, (n_tok, n_bytes, ls, lt) in domains.items():
        per_token[d] = ls - lt
        per_byte[d] = log_ratio_per_byte(ls * n_tok, lt * n_tok, n_bytes)
        rescaled[d] = log_ratio_per_student_token(ls * n_tok, lt * n_tok, n_tok)
        assert per_byte[d] == pytest.approx(per_token[d] * n_tok / n_bytes)  # 0.125, 0.2, 0.0333
        assert rescaled[d] == pytest.approx(per_token[d])
    # within one domain the per-byte gap is increasing in the per-token gap (factor n_tok / n_bytes > 0)
    n_tok, n_bytes = 400, 1600
    gaps = [log_ratio_per_byte((2.0 + x) * n_tok, 2.0 * n_tok, n_bytes) for x in (-0.2, 0.0, 0.3, 0.5)]
    assert gaps == sorted(gaps) and gaps[1] == 0.0
    rank = lambda r: sorted(r, key=r.get, reverse=True)  # noqa: E731
    assert rank(per_token) == ["code", "web", "math"]
    assert rank(rescaled) == rank(per_token)
    assert rank(per_byte) == ["web", "code", "math"]  # the plain per-byte gap reorders code and web


def test_the_worked_example_of_the_architecture_page(pair):
    """docs/architecture.md, "Cross-tokenizer alignment", the first group ("naïve"): the teacher after "ïve" says ▁caf 0.6, ▁c 0.2, ▁ 0.1 (tail 0.1); the student after "ve" says Ġc 0.5, Ġ 0.1, and on
    its non-shared tokens afÃ© 0.05, ve 0.03, na 0.02, naÃ¯ ~0; the other 0.3 spread over its other shared tokens.
    By hand: match = 0.2 ln(0.2/0.5) + 0.7 ln(0.7/0.4) = 0.208473, ULD = |0.05-0.6| + 0.03 + 0.02 = 0.6,
    weights 263/276 and 13/276: 0.226914."""
    S, T = pair
    sv, tv = S.get_vocab(), T.get_vocab()
    shared = shared_vocab(sv, "byte_level", tv, "sentencepiece", SPECIAL, SPECIAL)
    V_S, V_T = len(sv), len(tv)
    s_mask = shared.student_mask(V_S)
    assert sorted(p for p, i in sv.items() if not s_mask[i]) == sorted(["naÃ¯", "na", "ve", "afÃ©"])
    q = np.zeros(V_S)
    q[[sv["Ġc"], sv["Ġ"], sv["afÃ©"], sv["ve"], sv["na"], sv["naÃ¯"]]] = [0.5, 0.1, 0.05, 0.03, 0.02, 1e-9]
    rest = s_mask.copy()
    rest[[sv["Ġc"], sv["Ġ"]]] = False
    q[rest] = (1.0 - q.sum()) / rest.sum()
    logits = torch.tensor(np.log(q), dtype=torch.float32).view(1, 1, V_S)
    t_ids = torch.tensor([[tv["▁caf"], tv["▁c"], tv["▁"]]])
    t_lp = torch.tensor([[0.6, 0.2, 0.1]]).log()
    _, parts = xtok_distill_loss(logits, torch.tensor([[-100]]), torch.tensor([0]), t_ids, t_lp,
                                 torch.from_numpy(shared.teacher_to_student(V_T)), torch.from_numpy(s_mask), 1.0)
    assert parts["match"].item() == pytest.approx(0.2 * math.log(0.2 / 0.5) + 0.7 * math.log(0.7 / 0.4), abs=1e-5)
    assert parts["uld"].item() == pytest.approx(0.6, abs=1e-5)
    assert parts["kl"].item() == pytest.approx(263 / 276 * 0.208473 + 13 / 276 * 0.6, abs=1e-5)
