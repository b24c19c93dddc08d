import inspect
import math

import numpy as np

from avlink.rank import best, sync_scores
from avlink.sync import SyncRanker

from helpers import clicks, jumping_square

FPS, SR = 6.0, 22050
JUMPS = [4, 9, 13]  # frames of a 16-frame clip where the square moves


def test_v2a_keeps_the_sound_whose_onsets_land_on_the_motion():
    frames = jumping_square(16, JUMPS)
    in_sync = clicks([k / FPS for k in JUMPS], 16 / FPS)
    late = clicks([k / FPS + 0.4 for k in JUMPS], 16 / FPS)
    silent = np.zeros_like(in_sync)
    scores = sync_scores("v2a", frames, [late, in_sync, silent], FPS, SR)
    assert scores[1] == 1.0 and scores[0] == scores[2] == 0.0, scores
    assert best(scores) == 1


def test_a2v_keeps_the_video_whose_motion_lands_on_the_onsets():
    sound = clicks([k / FPS for k in JUMPS], 16 / FPS)
    scores = sync_scores("a2v", sound, [jumping_square(16, [2, 7, 11]), jumping_square(16, JUMPS)], FPS, SR)
    assert scores[1] == 1.0 > scores[0], scores
    assert best(scores) == 1


def test_audio_start_puts_the_onsets_where_the_sound_starts():
    """A window's audio starts up to a token off its first frame: onsets count from the first frame."""
    frames, shift = jumping_square(16, JUMPS), 0.3
    early = clicks([k / FPS - shift for k in JUMPS], 16 / FPS)  # the sound starts `shift` s after frame 0
    assert sync_scores("v2a", frames, [early], FPS, SR) == [0.0]
    assert sync_scores("v2a", frames, [early], FPS, SR, audio_start=shift) == [1.0]


def test_nan_ranks_lowest_and_ties_keep_the_lower_candidate():
    assert best([math.nan, 0.5, 0.5]) == 1
    assert best([0.2, 0.2, 0.1]) == 0 and best([math.nan, math.nan]) == 0
    assert best([0.0, math.nan, 0.3]) == 2


def test_the_ranker_is_given_the_input_and_the_candidates_and_nothing_else():
    """No parameter could carry a reference (the input's own other modality, ground truth): the learned scorer
    takes a window's input and candidates alone, and comes to sync_scores as weights loaded with the checkpoint."""
    assert list(inspect.signature(sync_scores).parameters) == [
        "task", "conditioning", "candidates", "fps", "sample_rate", "audio_start", "scorer"]
    assert list(inspect.signature(SyncRanker.scores).parameters) == ["self", "task", "conditioning", "candidates"]
