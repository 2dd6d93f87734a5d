# Writes jieba_hmm.model: Python jieba 0.42.1's HMM (jieba/finalseg/prob_*.py) in the text format
# that jieba-rs's `HmmModel::load` reads, every probability as Python's repr (shortest round-trip),
# so Rust parses exactly the doubles Python uses. (jieba-rs's built-in model rounds the emission
# probabilities to 6 decimals, which can change Viterbi decisions.)
# usage: pip install jieba==0.42.1 && python make_jieba_hmm_model.py > jieba_hmm.model
# jieba_dict.txt beside it is jieba 0.42.1's jieba/dict.txt as the package ships it (MIT licence).
from jieba.finalseg.prob_emit import P as emit
from jieba.finalseg.prob_start import P as start
from jieba.finalseg.prob_trans import P as trans
from jieba.finalseg import MIN_FLOAT

STATES = "BEMS"  # jieba-rs's state indices: B=0, E=1, M=2, S=3
print("# jieba 0.42.1 finalseg HMM, full precision; states B E M S")
print(" ".join(repr(start.get(s, MIN_FLOAT)) for s in STATES))
for a in STATES:
    print(" ".join(repr(trans[a].get(b, MIN_FLOAT)) for b in STATES))
for s in STATES:
    for ch in emit[s]:
        assert len(ch) == 1 and ch not in ",:#" and not ch.isspace(), ch
    print(",".join(f"{ch}:{p!r}" for ch, p in emit[s].items()))
