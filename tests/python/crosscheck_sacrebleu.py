#!/usr/bin/env python3
"""tmoe's corpus BLEU, chrF and 13a tokenization against the Python sacrebleu package, on 30 cases.

    crosscheck_sacrebleu.py EVAL_TOOL WORKDIR

Scores must agree to 0.01 and every tokenized hypothesis exactly. The cases are fixed (a seeded generator plus
hand-written edge cases: punctuation, numbers, HTML entities, Unicode spaces and scripts, empty lines, several
references, no matches at all).
"""
import json
import os
import random
import subprocess
import sys

import sacrebleu
from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a


def edge_cases():
    return [
        {"hyps": ["the cat sat on the mat"], "refs": [["the cat sat on the mat"]]},
        {"hyps": ["a b c d"], "refs": [["w x y z"]]},
        {"hyps": ["", "the dog"], "refs": [["a dog barks", "the dog"]]},
        {"hyps": ["Hello, world! (test) [x] {y} 'quote' \"dq\" a/b c:d e;f g?h ~ ^ _ ` | @ # $ % + = < >"],
         "refs": [["Hello world , ( test ) [ x ] { y } ' quote ' \" dq \" a / b"]]},
        {"hyps": ["3.14 1,000 10-20 2-nd a-b -5 .5 5. ,5 a,b a.b 1.a a.1 x-1 1--2"],
         "refs": [["3.14 1,000 10 - 20 2 - nd a-b -5 .5 5 . , 5"]]},
        {"hyps": ["&amp; &lt;tag&gt; &quot;q&quot; &#39; AT&T & co"], "refs": [["& <tag> \"q\" ' AT & T & co"]]},
        {"hyps": ["Äpfel und Birnen — «très» bien, señor", "東京は日本の首都です。", "مرحبا بالعالم"],
         "refs": [["Äpfel und Birnen - « très » bien , señor", "東京は 日本の 首都です 。", "مرحبا بالعالم !"]]},
        {"hyps": ["non\u00a0breaking\u2009thin\u3000ideographic  double\ttab ", "  leading and trailing  "],
         "refs": [["non breaking thin ideographic double tab", "leading and trailing"]]},
        {"hyps": ["short", "also short"], "refs": [["a much longer reference sentence here", "also quite long"]]},
        {"hyps": ["this hypothesis is rather longer than its reference"], "refs": [["this hypothesis"]]},
        {"hyps": ["the cat is on the mat", "there is a cat"],
         "refs": [["the cat is on the mat", "a cat is there"], ["there is a cat on the mat", "there is a cat"]]},
        {"hyps": ["one two three four five"],
         "refs": [["one two three"], ["one two three four five six seven"], ["one two three four five six"]]},
        {"hyps": ["x y"], "refs": [["x y z w"], ["x"], ["x y z"]]},
        {"hyps": ["emoji 😀 test ok", "ÉÈÊ ünïcödé"], "refs": [["emoji 😀 test", "ÉÈÊ ünïcödé"]]},
        {"hyps": ["word."], "refs": [["word ."]]},
    ]


def random_cases(rng, count):
    vocab = ["the", "a", "cat", "dog", "sat", "on", "mat", "house", "red", "big", "runs", "fast", "and", "or",
             "über", "café", "naïve", "3.5", "1,2", "x-y", "(", ")", ",", ".", "!", "?", "'s", "don't"]
    cases = []
    for k in range(count):
        lines = 5 + 7 * k
        noise = 0.1 * (k % 8)
        hyps, refs, refs2 = [], [], []
        for _ in range(lines):
            ref = [rng.choice(vocab) for _ in range(rng.randint(1, 18))]
            hyp = [w if rng.random() > noise else rng.choice(vocab) for w in ref]
            if rng.random() < noise:
                hyp = hyp[: max(0, len(hyp) - rng.randint(0, 4))]
            if rng.random() < 0.2:
                hyp.append(rng.choice(vocab))
            hyps.append(" ".join(hyp))
            refs.append(" ".join(ref))
            refs2.append(" ".join(w if rng.random() > 0.3 else rng.choice(vocab) for w in ref))
        cases.append({"hyps": hyps, "refs": [refs, refs2] if k % 3 == 0 else [refs]})
    return cases


def main():
    tool, workdir = sys.argv[1], sys.argv[2]
    os.makedirs(workdir, exist_ok=True)
    cases = edge_cases() + random_cases(random.Random(20261126), 15)
    path = os.path.join(workdir, "eval_cases.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(cases, f, ensure_ascii=False)
    ours = json.loads(subprocess.run([tool, path], check=True, capture_output=True, text=True).stdout)
    tok = Tokenizer13a()
    failures = 0
    for i, (case, got) in enumerate(zip(cases, ours)):
        bleu = sacrebleu.corpus_bleu(case["hyps"], case["refs"]).score
        chrf = sacrebleu.corpus_chrf(case["hyps"], case["refs"]).score
        ok = abs(bleu - got["bleu"]) <= 0.01 and abs(chrf - got["chrf"]) <= 0.01
        for h, t in zip(case["hyps"], got["tokenized"]):
            if tok(h.rstrip()) != t and tok(h) != t:
                print(f"case {i}: tokenization differs for {h!r}: sacrebleu {tok(h)!r}, tmoe {t!r}")
                ok = False
        print(f"case {i:2d}: BLEU {bleu:8.4f} vs {got['bleu']:8.4f}   chrF {chrf:8.4f} vs {got['chrf']:8.4f}"
              f"   {'ok' if ok else 'MISMATCH'}")
        failures += 0 if ok else 1
    print(f"{len(cases)} cases, {failures} mismatches")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
