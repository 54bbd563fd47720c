"""The per-token compute page: the routing it shows is the routing generate() recorded, it needs
nothing from the network, and in headless Chromium a person sees one shaded element per token and
a token's block row on click. The browser test saves a screenshot to test-artifacts/."""
import os
import re
import shutil
import tempfile

import pytest
import torch

from dllm.token_view import ALWAYS_ON, EXECUTED, KIND_NAMES, RESERVED, SKIPPED, SHADE_RGB, render_html, \
    sequences_from_generation, token_pieces, write_html
from dllm.core.routing import DenseRouting
from helpers import PROMPTS, ROOT, encode, make_generator

ARTIFACTS = os.path.join(ROOT, "test-artifacts")
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1400,1000"]


@pytest.fixture(scope="module")
def generated(tokenizer_path):
    """A random routed model (1 always-on block of 4, 2 reserved positions) after a ragged greedy batch."""
    generator = make_generator(tokenizer_path)
    out, _, actprobs, stats = generator.generate(encode(generator, PROMPTS[:2]), max_gen_len=10, temperature=0.0)
    return generator, out, actprobs, stats


@pytest.mark.slow
def test_cells_are_the_recorded_routing(generated):
    generator, out, actprobs, stats = generated
    args = generator.model.params
    sequences = sequences_from_generation(generator, stats)
    assert len(sequences) == 2
    for row, seq in enumerate(sequences):
        n = stats.lengths[row]
        assert len(seq.pieces) == len(seq.kinds) == n == stats.prompt_lengths[row] + len(out[row])
        executed = stats.activation[row, :n] > 0.5
        for pos, cells in enumerate(seq.kinds):
            for block, kind in enumerate(cells):
                if block < args.dynamic_start_layer:
                    assert kind == ALWAYS_ON
                elif pos < args.dynamic_reserve_initials:
                    assert kind == RESERVED and executed[pos, block]
                else:
                    assert kind == (EXECUTED if executed[pos, block] else SKIPPED)
        assert seq.shares == pytest.approx(executed.float().mean(1).tolist())
        assert seq.shares[seq.n_prompt:] == pytest.approx(actprobs[row])  # what generate() reported
        assert seq.exec_ratio == pytest.approx(stats.exec_share(row))
        assert seq.kv_ratio == pytest.approx(float(executed.float().mean()))
        assert SKIPPED in {k for cells in seq.kinds for k in cells}, "the random routers must skip something"


def test_dense_model_runs_every_block_always_on(tokenizer_path):
    generator = make_generator(tokenizer_path)
    generator.model.use_routing(DenseRouting())
    stats = generator.generate(encode(generator, PROMPTS[:1]), max_gen_len=4, temperature=0.0).routing
    seq, = sequences_from_generation(generator, stats)
    assert {k for cells in seq.kinds for k in cells} == {ALWAYS_ON}
    assert seq.shares == [1.0] * len(seq.pieces) and seq.exec_ratio == seq.kv_ratio == seq.flops_ratio == 1.0


def test_pieces_spell_the_decoded_text(generated):
    generator, _, _, stats = generated
    tokenizer = generator.tokenizer
    tokens = stats.tokens[0][: stats.prompt_lengths[0]]  # <s> "The quick brown fox"
    pieces = token_pieces(tokenizer, tokens)
    assert len(pieces) == len(tokens)
    # bos and the leading "▁" (SentencePiece drops the first space) add no text: shown as spelled
    assert pieces[:2] == [tokenizer.token_text(tokenizer.bos_id), "▁"] == [tokenizer.token_text(t) for t in tokens[:2]]
    assert "".join(pieces[2:]) == "The quick brown fox"


def test_page_needs_nothing_from_outside(generated):
    page = render_html(sequences_from_generation(generated[0], generated[3]))
    assert not re.search(r"""\b(src|href)\s*=|url\(|@import|https?:""", page)


def chromium():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    assert os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER), \
        "needs Debian's chromium and chromium-driver: see the README's test command"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    options.add_argument(f"--user-data-dir={profile}")
    return webdriver.Chrome(options=options, service=Service(CHROMEDRIVER)), profile


def background_alpha(css: str) -> float:
    """The alpha of a computed `rgba(r, g, b, a)` (Chromium writes `rgb(r, g, b)` for alpha 1)."""
    values = [float(v) for v in re.findall(r"[\d.]+", css)]
    assert values[:3] == list(SHADE_RGB), css
    return values[3] if len(values) == 4 else 1.0


@pytest.mark.slow
def test_browser_shows_shading_and_block_row_on_click(generated, tmp_path):
    from selenium.webdriver.common.by import By

    generator, _, _, stats = generated
    sequences = sequences_from_generation(generator, stats)
    page = tmp_path / "routing.html"
    write_html(sequences, str(page))
    driver, profile = chromium()
    try:
        driver.get(page.as_uri())
        sections = driver.find_elements(By.CSS_SELECTOR, "section.seq")
        assert len(sections) == len(sequences)
        for row, (section, seq) in enumerate(zip(sections, sequences)):
            tokens = section.find_elements(By.CSS_SELECTOR, "[data-token]:not(td)")
            assert [int(t.get_attribute("data-token")) for t in tokens] == list(range(stats.lengths[row]))
            shown = [background_alpha(t.value_of_css_property("background-color")) for t in tokens]
            recorded = (stats.activation[row, : stats.lengths[row]] > 0.5).float().mean(1)
            assert torch.allclose(torch.tensor(shown), recorded, atol=2e-3)  # Chromium keeps alpha in 8 bits

            block_row = section.find_element(By.CSS_SELECTOR, ".blockrow")
            assert not block_row.is_displayed()
            target = len(tokens) - 1  # the last generated token
            tokens[target].click()
            assert block_row.is_displayed()
            cells = block_row.find_elements(By.CSS_SELECTOR, ".cell")
            assert [c.get_attribute("data-kind") for c in cells] == [KIND_NAMES[k] for k in seq.kinds[target]]
            highlighted = section.find_elements(By.CSS_SELECTOR, ".grid td.hl")
            assert {int(td.get_attribute("data-token")) for td in highlighted} == {target}
            assert len(highlighted) == len(seq.kinds[target])
        assert driver.execute_script("return performance.getEntriesByType('resource').length") == 0
        os.makedirs(ARTIFACTS, exist_ok=True)
        assert driver.save_screenshot(os.path.join(ARTIFACTS, "token_view.png"))
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
