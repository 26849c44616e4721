//! Active health checks: `GET <path>` on every target each interval; a target
//! turns unhealthy after `unhealthy_threshold` failures in a row and healthy
//! again after `healthy_threshold` passes in a row.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};

use bytes::Bytes;
use http::{Method, Request, header};

use super::{Exchange, RequestFraming, SendError, Sender, Target, UpstreamPool, send_encoded};
use crate::config::HealthCheckConfig;
use crate::http::body::RequestBody;

/// Per-target streaks, owned by the check loop alone.
#[derive(Default, Clone, Copy)]
struct Streak {
    passes: u32,
    failures: u32,
}

pub(super) async fn check_loop(pool: Weak<UpstreamPool>) {
    let Some(hc) = pool.upgrade().and_then(|p| p.config.health_check.clone()) else {
        return;
    };
    let mut streaks: Vec<(Arc<Target>, Streak)> = Vec::new();
    let mut tick = tokio::time::interval(hc.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(pool) = pool.upgrade() else { return };
        let targets = pool.targets();
        streaks.retain(|(t, _)| targets.iter().any(|x| Arc::ptr_eq(x, t)));
        let results =
            futures_util::future::join_all(targets.iter().map(|t| check(&pool, t, &hc))).await;
        for (target, passed) in targets.iter().zip(results) {
            let streak = match streaks.iter_mut().find(|(t, _)| Arc::ptr_eq(t, target)) {
                Some((_, s)) => s,
                None => {
                    streaks.push((target.clone(), Streak::default()));
                    &mut streaks.last_mut().expect("just pushed").1
                }
            };
            update(&pool, target, streak, passed, &hc);
        }
    }
}

fn update(
    pool: &UpstreamPool,
    target: &Target,
    s: &mut Streak,
    passed: bool,
    hc: &HealthCheckConfig,
) {
    let healthy = target.healthy.load(Ordering::Relaxed);
    if passed {
        pool.readmit(target, "a health check passed");
        s.failures = 0;
        s.passes = s.passes.saturating_add(1);
        if !healthy && s.passes >= hc.healthy_threshold {
            target.healthy.store(true, Ordering::Relaxed);
            pool.metrics.became_healthy.inc();
            tracing::info!(route = %pool.route, target = %target.addr, "upstream target healthy again");
        }
    } else {
        s.passes = 0;
        s.failures = s.failures.saturating_add(1);
        if healthy && s.failures >= hc.unhealthy_threshold {
            target.healthy.store(false, Ordering::Relaxed);
            pool.metrics.became_unhealthy.inc();
            tracing::warn!(route = %pool.route, target = %target.addr, failures = s.failures,
                "upstream target failed health checks; taken out of rotation");
        }
    }
}

/// One check of `target`, sent the way its requests go.
async fn check(pool: &UpstreamPool, target: &Target, hc: &HealthCheckConfig) -> bool {
    let sender = pool.health_clients.sender(target, pool.config.protocol);
    let status = match sender {
        Sender::H1 { proxy, tls } => {
            let head = format!(
                "GET {} HTTP/1.1\r\nhost: {}\r\nuser-agent: tollgate-health-check\r\n\r\n",
                hc.path,
                target.host_header.to_str().unwrap_or_default()
            );
            let to = Exchange {
                addr: target.addr,
                tls,
                method: &Method::GET,
                proxy,
                wire: false,
                upgrade: false,
            };
            let sent = send_encoded(
                to,
                Bytes::from(head),
                RequestBody::empty(),
                RequestFraming::Length(0),
            );
            tokio::time::timeout(hc.timeout, sent)
                .await
                .map(|r| r.map(|resp| resp.status()).map_err(SendError::from))
        }
        Sender::H2c(_) | Sender::H2(_) => {
            let scheme = match sender {
                Sender::H2(_) => "https",
                _ => "http",
            };
            let uri = format!("{scheme}://{}{}", target.uri_authority, hc.path);
            let Ok(req) = Request::get(uri)
                .version(http::Version::HTTP_2)
                .header(header::HOST, target.host_header.clone())
                .header(header::USER_AGENT, "tollgate-health-check")
                .body(RequestBody::empty())
            else {
                return false;
            };
            tokio::time::timeout(hc.timeout, sender.send(req))
                .await
                .map(|r| r.map(|resp| resp.status()))
        }
    };
    match status {
        Ok(Ok(status)) => status.is_success() || status.is_redirection(),
        Ok(Err(e)) => {
            tracing::debug!(route = %pool.route, target = %target.addr, error = %crate::telemetry::error_chain(&e), "health check failed");
            false
        }
        Err(_) => {
            tracing::debug!(route = %pool.route, target = %target.addr, "health check timed out");
            false
        }
    }
}
