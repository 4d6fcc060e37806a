// Auto-refresh that can be paused. The paused state is kept in localStorage;
// ?refresh=0 in the URL turns it off for that view, ?refresh=N sets the period.
(function () {
  'use strict';
  var box = document.getElementById('autorefresh');
  if (!box) { return; }
  var secs = parseInt(box.getAttribute('data-seconds'), 10) || 10;
  var key = 'bedsObserverPaused';
  var paused = false;
  try { paused = window.localStorage.getItem(key) === '1'; } catch (e) { /* storage off: not paused */ }
  box.checked = !paused && box.getAttribute('data-url-off') !== '1';
  var timer = null;
  function arm() {
    if (timer) { clearTimeout(timer); timer = null; }
    if (box.checked) { timer = setTimeout(function () { window.location.reload(); }, secs * 1000); }
  }
  box.addEventListener('change', function () {
    try { window.localStorage.setItem(key, box.checked ? '0' : '1'); } catch (e) { /* ignore */ }
    arm();
  });
  arm();
})();
