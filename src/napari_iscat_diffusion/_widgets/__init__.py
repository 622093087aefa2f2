"""napari dock widgets: thin Qt glue over ``synthetic`` and ``export``. Importing these modules imports torch,
so only the npe2 widget commands (run when a widget is opened) import them."""
