ALTER ROLE x -- PASSWORD '
secret' --'
select 1 --; create table hidden(x int); --
