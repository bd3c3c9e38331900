"""Campaigns: their config and search space (``campaign``), running them on Ray Tune
(``runner``) and the schedulers Tune lacks (``schedulers``)."""
