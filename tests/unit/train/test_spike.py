"""The spike rule (engine.train.spike): loss > factor x the median of the last `window` steps,
judged only with a full window, spikes kept out of the window."""

from engine.config.spike import SpikeConfig
from engine.train.spike import SpikeWatch, spike_of


def test_the_median_of_the_last_window_steps_decides():
    config = SpikeConfig(factor=2.0, window=3)
    assert spike_of(100.0, [1.0, 1.0], config) is None  # no full window yet
    assert spike_of(4.1, [9.0, 2.0, 1.0, 2.0], config) == 2.0  # median of the last 3 only
    assert spike_of(4.0, [2.0, 2.0, 2.0], config) is None  # not above factor x median


def test_spikes_stay_out_of_the_window():
    watch = SpikeWatch(SpikeConfig(factor=1.5, window=2), history=[1.0, 1.0])
    assert watch.check(3, 2.0).median == 1.0
    assert watch.check(4, 1.9).median == 1.0  # still judged against the steps before the spike
    assert watch.check(5, 1.2) is None and list(watch.recent) == [1.0, 1.2]
