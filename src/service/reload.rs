//! Reloading the template set without a restart (SIGHUP, `beds reload`,
//! `POST /reload`): the template folder is read again, the new set is
//! checked like IPL step 7 (templates valid against the config the node
//! started with, their procedures and collections there), and only then
//! swapped in whole. If anything is wrong the old set keeps serving and
//! the answer says exactly what. `logging.level` is read again from the
//! config folder too; every other setting needs a restart.

use std::path::PathBuf;
use std::sync::Arc;

use arc_swap::ArcSwap;
use serde::Serialize;
use tokio::sync::Mutex;

use super::health::Readiness;
use super::metrics::Metrics;
use super::notify;
use crate::config::{Config, ConfigError};
use crate::logger::EventLog;
use crate::namaste::Adapters;
use crate::registry::Registry;

/// Longest a reload may take (its database checks are bounded by the
/// drivers' timeouts; this bounds them all, so a drain never waits longer).
const LIMIT: std::time::Duration = std::time::Duration::from_secs(60);

/// What a reload needs; one per node.
pub struct Reloader {
    /// The config folder, read again for `logging.level`.
    pub dir: PathBuf,
    /// The config the node started with: templates are checked against
    /// it, since its databases are the ones open.
    pub config: Config,
    pub registry: Arc<ArcSwap<Registry>>,
    pub adapters: Adapters,
    pub events: EventLog,
    pub metrics: Arc<Metrics>,
    /// A draining node refuses reloads.
    pub readiness: Arc<Readiness>,
    /// One reload at a time (a SIGHUP and a `beds reload` at once); the
    /// drain takes it too, so no reload runs past `STOPPING=1`.
    pub running: Mutex<()>,
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
        if !self.readiness.is_serving() {
            return self.refused(vec!["the node is not serving (starting or draining)".into()]);
        }
        notify::reloading();
        tracing::info!("reload: loading templates");
        let out = match tokio::time::timeout(LIMIT, self.attempt()).await {
            Ok(out) => out,
            Err(_) => self.refused(vec![format!(
                "checking the new set took longer than {LIMIT:?} (a database does not answer)"
            )]),
        };
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
        let line = crate::ipl::ready_line(&self.config, self.registry.load().len());
        self.readiness.phase(&line);
        notify::ready(&line);
        out
    }

    /// The answer when the serving set stays.
    fn refused(&self, problems: Vec<String>) -> Reloaded {
        Reloaded {
            ok: false,
            templates: self.registry.load().len(),
            problems,
            logging: "logging level unchanged".into(),
        }
    }

    async fn attempt(&self) -> Reloaded {
        let config = &self.config;
        let reg = match Registry::load_dir(&config.node.templates, config) {
            Ok(r) => r,
            Err(p) => return self.refused(p),
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
            return self.refused(problems);
        }
        let templates = reg.len();
        self.registry.store(Arc::new(reg));
        self.metrics.templates_loaded(templates);
        let logging = match Config::load(&self.dir, config.env) {
            Ok(new) => match crate::logging::set_level(&new.logging.level) {
                Ok(true) => format!("logging level {}", new.logging.level),
                Ok(false) => "logging level unchanged (RUST_LOG is set)".into(),
                Err(e) => format!("logging level unchanged: {e}"),
            },
            Err(e) => format!("logging level unchanged: config: {}", first_line(&e)),
        };
        Reloaded {
            ok: true,
            templates,
            problems: Vec::new(),
            logging,
        }
    }
}

/// A config error without the file excerpt a parse error quotes (the
/// line could hold a secret, and this text goes to the event log).
fn first_line(e: &ConfigError) -> String {
    let text = e.to_string();
    match e {
        ConfigError::Parse(_) => text.lines().next().unwrap_or_default().to_string(),
        _ => text,
    }
}
