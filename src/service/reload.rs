//! Reloading the template set without a restart (SIGHUP, `beds reload`,
//! `POST /reload`): the new set is loaded from the config folder, checked
//! like IPL step 7 (templates valid, their procedures and collections
//! there), and only then swapped in whole. If anything is wrong the old
//! set keeps serving and the answer says exactly what. `logging.level` is
//! reloaded too; every other setting needs a restart.

use std::path::PathBuf;
use std::sync::Arc;

use arc_swap::ArcSwap;
use serde::Serialize;
use tokio::sync::Mutex;

use super::metrics::Metrics;
use super::notify;
use crate::config::{Config, Env};
use crate::logger::EventLog;
use crate::namaste::Adapters;
use crate::registry::Registry;

/// What a reload needs; one per node.
pub struct Reloader {
    pub dir: PathBuf,
    pub env: Env,
    pub registry: Arc<ArcSwap<Registry>>,
    pub adapters: Adapters,
    pub events: EventLog,
    pub metrics: Arc<Metrics>,
    /// One reload at a time (a SIGHUP and a `beds reload` at once).
    pub running: Mutex<()>,
    /// The status line systemd shows once the reload is over.
    pub ready_line: String,
}

/// A reload's result, as `beds reload` prints it.
#[derive(Debug, Serialize)]
pub struct Reloaded {
    pub ok: bool,
    /// Templates serving after the reload (the old count when refused).
    pub templates: usize,
    /// Why the new set was refused (empty when it went into service).
    pub problems: Vec<String>,
    /// The logging level now in force, or why it was not changed.
    pub logging: String,
}

impl Reloader {
    pub async fn reload(&self) -> Reloaded {
        let _one = self.running.lock().await;
        notify::reloading();
        tracing::info!("reload: loading templates");
        let out = self.attempt().await;
        if out.ok {
            let msg = format!(
                "reload: {} templates in service; {}",
                out.templates, out.logging
            );
            tracing::info!("{msg}");
            self.events.lifecycle("ok", "reload", msg);
        } else {
            let msg = format!(
                "reload refused, the previous {} templates keep serving: {}",
                out.templates,
                out.problems.join("; ")
            );
            tracing::error!("{msg}");
            self.events.lifecycle("error", "reload", msg);
        }
        self.metrics.reload(out.ok);
        notify::ready(&self.ready_line);
        out
    }

    async fn attempt(&self) -> Reloaded {
        let serving = self.registry.load().len();
        let refused = |problems: Vec<String>| Reloaded {
            ok: false,
            templates: serving,
            problems,
            logging: "logging level unchanged".into(),
        };
        let config = match Config::load(&self.dir, self.env) {
            Ok(c) => c,
            Err(e) => return refused(vec![format!("config: {e}")]),
        };
        let reg = match Registry::load_dir(&config.node.templates, &config) {
            Ok(r) => r,
            Err(p) => return refused(p),
        };
        // Databases are opened at IPL only: a template on another one
        // needs a restart.
        let mut problems: Vec<String> = reg
            .templates()
            .filter(|t| self.adapters.get(&t.database).is_none())
            .map(|t| {
                format!(
                    "template {} uses database {}, which this node did not open at start (databases change only with a restart)",
                    t.name, t.database
                )
            })
            .collect();
        if problems.is_empty() {
            let (missing, errors) = crate::ipl::check_objects(&reg, &self.adapters).await;
            problems.extend(missing);
            problems.extend(errors.iter().map(|e| e.to_string()));
        }
        if !problems.is_empty() {
            return refused(problems);
        }
        let templates = reg.len();
        self.registry.store(Arc::new(reg));
        self.metrics.templates_loaded(templates);
        let logging = match crate::logging::set_level(&config.logging.level) {
            Ok(true) => format!("logging level {}", config.logging.level),
            Ok(false) => "logging level unchanged (RUST_LOG is set)".into(),
            Err(e) => format!("logging level unchanged: {e}"),
        };
        Reloaded {
            ok: true,
            templates,
            problems: Vec::new(),
            logging,
        }
    }
}
