"""The demo's readable pictures: one row per class with its name, SAG figures
with a caption per column and the step in a title line."""

import numpy as np

from improved_diffusion.run.pictures import TEXT_HEIGHT, class_rows, sag_figure


def test_class_rows_puts_each_class_on_its_own_row_with_its_name():
    # class c drawn as gray level 20 * (c + 1); labels shuffled, class 2 drawn once only
    labels = np.array([1, 0, 2, 1, 0, 1, 0])
    images = np.stack([np.full((4, 4, 3), 20 * (c + 1), dtype=np.uint8) for c in labels])
    pic = class_rows(images, labels, ["zero", "one", "two"], per_class=2, scale=1, pad=1,
                     label_width=30)
    grid_h = 1 + 3 * (4 + 1)
    assert pic.shape == (grid_h, 30 + 1 + 2 * (4 + 1), 3)
    for r in range(3):
        y = 1 + r * 5
        first = pic[y : y + 4, 30 + 1 : 30 + 5]
        assert (first == 20 * (r + 1)).all()
        second = pic[y : y + 4, 30 + 6 : 30 + 10]
        expected = 255 if r == 2 else 20 * (r + 1)  # blank where the class has no second sample
        assert (second == expected).all()
        assert (pic[y : y + 5, :30] < 128).any()  # some dark text in the name column of each row


def test_class_rows_puts_other_sets_of_the_same_positions_beside_after_a_gap():
    # positions 0..3 with labels [1, 0, 1, 1]; set A is gray 10 * (p + 1), set B 100 + that
    labels = np.array([1, 0, 1, 1])
    a = np.stack([np.full((4, 4, 3), 10 * (p + 1), dtype=np.uint8) for p in range(4)])
    b = a + 100
    pic = class_rows(a, labels, ["zero", "one"], per_class=2, scale=1, pad=1, label_width=30,
                     more=[b], captions=["with", "without"])
    # 2 tiles, a gap, 2 tiles: 5 columns of 4 + 1 px; a caption line on top
    assert pic.shape == (TEXT_HEIGHT + 1 + 2 * 5, 30 + 1 + 5 * 5, 3)
    y0 = TEXT_HEIGHT + 1

    def tile(row, column):
        y, x = y0 + row * 5, 30 + 1 + column * 5
        return pic[y : y + 4, x : x + 4]

    # class 0: position 1 only; class 1: positions 0 and 2 (the first two)
    expected = {0: [20, 255], 1: [10, 30]}
    for row, values in expected.items():
        for column, v in enumerate(values):
            assert (tile(row, column) == v).all()
            assert (tile(row, 3 + column) == (v if v == 255 else v + 100)).all()
        assert (tile(row, 2) == 255).all()  # the gap
    assert (pic[:TEXT_HEIGHT, 31 : 31 + 3 * 5] < 128).any()  # caption over block A
    assert (pic[:TEXT_HEIGHT, 31 + 3 * 5 :] < 128).any()  # and over block B


def test_sag_figure_captions_and_title_add_text_lines():
    cols = [np.full((2, 8, 8, 3), v, dtype=np.uint8) for v in (0, 80, 160, 240)]
    plain = sag_figure(cols, scale=1)
    captioned = sag_figure(cols, scale=1, captions=["a", "b", "c", "d"], title="step 3")
    assert captioned.shape == (plain.shape[0] + 2 * TEXT_HEIGHT, plain.shape[1], 3)
    assert np.array_equal(captioned[2 * TEXT_HEIGHT :], plain)
    assert (captioned[: 2 * TEXT_HEIGHT] < 128).any()
