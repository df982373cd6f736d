//! tracing setup: every line carries the rank; rank 0 logs at `info`, the other ranks at `warn`,
//! unless `RUST_LOG` says otherwise (then every rank uses it).

use std::fmt;

use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::{DefaultFields, Format, Full, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

/// Prefixes every event with `[rank R/W]`, then the default format.
struct RankFormat {
    rank: usize,
    world: usize,
    inner: Format<Full>,
}

impl<S, N> FormatEvent<S, N> for RankFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        write!(writer, "[rank {}/{}] ", self.rank, self.world)?;
        self.inner.format_event(ctx, writer, event)
    }
}

/// Install the global subscriber (once; later calls are ignored). Logs go to stderr.
pub fn init(rank: usize, world: usize) {
    let filter = match std::env::var("RUST_LOG") {
        Ok(v) if !v.is_empty() => EnvFilter::new(v),
        _ if rank == 0 => EnvFilter::new("info"),
        _ => EnvFilter::new("warn"),
    };
    let format = RankFormat {
        rank,
        world,
        inner: Format::default().with_target(false),
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .fmt_fields(DefaultFields::new())
        .event_format(format)
        .try_init();
}
