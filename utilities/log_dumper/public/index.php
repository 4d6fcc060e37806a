<?php
// The observer's only entry point. The code lives in ../lib, outside the docroot.
declare(strict_types=1);

require __DIR__ . '/../lib/app.php';
obs_main();
