"""Support scripts outside the installed packages: the browser driver of the page's tests and benchmark (browser.py) and
what runs on a lent GPU machine (gpu/)."""
