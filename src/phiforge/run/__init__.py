"""`phiforge run`: the stage graph, the stages, the HTML report and the demo."""
