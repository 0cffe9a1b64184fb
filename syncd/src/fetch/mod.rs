//! Fetching from the master: the connection ([`master`]) under its deadlines ([`transport`]),
//! the manifest, and the object stream ([`stream`]): objects from the master and the object
//! store ([`store`]), decoded from zstd frames and deltas ([`decode`]) through bounded queues
//! ([`queue`]).

mod chunked;
pub mod decode;
pub mod master;
mod packs;
pub mod queue;
pub mod store;
pub mod stream;
pub mod transport;

pub use decode::{Bases, ObjectError};
pub use master::{Master, Received, Render};
pub use store::StoreTally;
pub use stream::ObjectStream;
pub use transport::{check_url, describe_status, Deadlines, StoreConfig, Transport};
