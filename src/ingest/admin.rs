//! The optional admin listener (`http.admin_listen`): `/metrics`, `/healthz` and
//! `/readyz` on an address of their own, so the endpoints that need no key can stay off
//! the public network. Shard 0 serves it with the same connection handling as the public
//! listener; the handler decides what each listener may answer (`Listener`).

use std::cell::Cell;
use std::rc::Rc;

use futures_lite::future;
use tracing::{debug, info};

use super::connection::{refuse_connection, serve_connection};
use super::listener::{Acceptor, ShardListener};
use super::state::{Listener, ShardContext};

/// Accepts admin connections until the shard stops, then closes the listener.
///
/// # Limitations
/// The admin listener is not drained like the public one: connections still in its
/// accept queue when the shard stops are reset, and open ones are not waited for (they
/// finish their current request, as any connection does at the stop). A scraper or
/// probe meets that as one failed poll, and `/readyz` already says `draining`.
pub(super) async fn serve_admin(ctx: Rc<ShardContext>, listener: ShardListener) {
    let open = Rc::new(Cell::new(0usize));
    let limit = ctx.shared.config.http.max_connections_per_shard;
    let mut acceptor = Acceptor::new(ctx.shard, &listener.listener);
    loop {
        let next = future::or(async { Some(acceptor.next_connection().await) }, async {
            ctx.stop.wait().await;
            None
        })
        .await;
        let stream = match next {
            None => break,
            Some(Some(stream)) => stream,
            Some(None) => continue,
        };
        let ctx = Rc::clone(&ctx);
        if open.get() >= limit {
            debug!(
                shard = ctx.shard,
                "admin connection over the cap, answering 503"
            );
            glommio::spawn_local(refuse_connection(ctx, stream)).detach();
            continue;
        }
        open.set(open.get() + 1);
        let open = Rc::clone(&open);
        glommio::spawn_local(async move {
            serve_connection(ctx, stream, Listener::Admin).await;
            open.set(open.get().saturating_sub(1));
        })
        .detach();
    }
    info!(shard = ctx.shard, "admin listener stopped");
}
